"""Validate and decode each image once, and store it re-encoded at a bounded size.

A bad image never raises: its row gets a reject reason (missing, empty, corrupt or truncated,
too many pixels) and every caption of it ends up in `rejects/`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

from .sources import read_bytes


@dataclass(frozen=True)
class Rejected(Exception):
    reason: str
    detail: str


def _open_checked(uri: str, data: bytes, max_pixels: int) -> Image.Image:
    """The decoded image, or `Rejected` whose detail names the file in stable words: PIL's own
    messages can hold an object address ("<_io.BytesIO object at 0x...>"), which would make two
    runs on the same input write different reject files."""
    if not data:
        raise Rejected("empty_image_file", f"{uri} has 0 bytes")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise Rejected("too_many_pixels", f"{uri}: {err}") from err
    except UnidentifiedImageError as err:
        raise Rejected("corrupt_image", f"{uri} ({len(data)} bytes) is not in an image format PIL can read") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise Rejected("corrupt_image", f"{uri} ({len(data)} bytes) has a damaged header: "
                                        f"{type(err).__name__}") from err
    width, height = image.size
    if width == 0 or height == 0:
        raise Rejected("zero_size_image", f"{uri} is {width}x{height}")
    if width * height > max_pixels:
        raise Rejected("too_many_pixels", f"{uri} is {width}x{height} = {width * height} pixels > limit {max_pixels}")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise Rejected("corrupt_image", f"{uri} ({len(data)} bytes) is truncated or damaged: decoding stopped "
                                        f"({type(err).__name__})") from err
    # A camera's EXIF orientation is applied: every stage sees the photo upright, as a viewer shows
    # it, and its width, height and boxes are those of the upright photo (see docs/data.md).
    return ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Transparent pixels become white, not black (the RGB conversion default)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def reencode(image: Image.Image, max_side: int, image_format: str) -> bytes:
    image = to_rgb(image)
    longest = max(image.size)
    if longest > max_side:
        scale = max_side / longest
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    if image_format == "jpeg":
        image.save(buffer, format="JPEG", quality=95)
    else:
        image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def read_checked(uri: str, max_pixels: int, data: bytes | None = None) -> Image.Image:
    """The decoded image of `uri` (its bytes read unless `data` holds them already), or `Rejected`."""
    if data is None:
        try:
            data = read_bytes(uri)
        except FileNotFoundError as err:
            raise Rejected("missing_image", f"{uri} does not exist") from err
        except OSError as err:
            raise Rejected("unreadable_image", f"{uri}: {err}") from err
    return _open_checked(uri, data, max_pixels)


def load_image(uri: str, max_pixels: int, max_side: int, image_format: str) -> tuple[bytes, int, int]:
    """(re-encoded bytes, original width, original height) or `Rejected`."""
    image = read_checked(uri, max_pixels)
    return reencode(image, max_side, image_format), image.width, image.height


def decode_stage(batch: pa.Table, max_pixels: int, max_side: int, image_format: str) -> pa.Table:
    """Ray Data stage: adds image, width, height; sets reject_reason/detail for bad images."""
    images, widths, heights = [], [], []
    reasons, details = batch["reject_reason"].to_pylist(), batch["reject_detail"].to_pylist()
    for row, uri in enumerate(batch["image_uri"].to_pylist()):
        try:
            if reasons[row]:
                raise Rejected(reasons[row], details[row])
            data, width, height = load_image(uri, max_pixels, max_side, image_format)
            images.append(data), widths.append(width), heights.append(height)
        except Rejected as rejected:
            images.append(None), widths.append(None), heights.append(None)
            reasons[row], details[row] = rejected.reason, rejected.detail
    return (batch.drop_columns(["reject_reason", "reject_detail"])
            .append_column("image", pa.array(images, pa.binary()))
            .append_column("width", pa.array(widths, pa.int32()))
            .append_column("height", pa.array(heights, pa.int32()))
            .append_column("reject_reason", pa.array(reasons, pa.string()))
            .append_column("reject_detail", pa.array(details, pa.string())))
