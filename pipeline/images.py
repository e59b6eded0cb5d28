"""Validate and decode each image once, and store it re-encoded at a bounded size.

A bad image never raises: its row gets a reject reason (missing, empty, corrupt or truncated,
too many pixels, an http(s) URL that cannot be fetched) and every caption of it ends up in
`rejects/`.
"""

from __future__ import annotations

import http.client
import io
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

from .sources import is_url, read_bytes

FETCH_TIMEOUT_S = 10.0  # the defaults of PrepareConfig.fetch_timeout / fetch_retries, for every job
FETCH_RETRIES = 2
FETCH_BACKOFF_S = 0.5  # before retry n: FETCH_BACKOFF_S * 2 ** (n - 1)
GONE = {404, 410}  # the image is not there: missing_image, never retried
RETRIED = {408, 425, 429, 500, 502, 503, 504}  # worth asking again; any other status fails at once
USER_AGENT = "harmoclip-ray (image-caption data preparation)"


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


def fetch_url(url: str, timeout: float = FETCH_TIMEOUT_S, retries: int = FETCH_RETRIES) -> bytes:
    """The body of an http(s) URL, or `Rejected` with a stable reason and detail: `missing_image`
    (HTTP 404 or 410, not retried), `fetch_timeout` (no byte for `timeout` seconds, on every
    attempt) or `fetch_failed` (another HTTP status, a refused or broken connection). Timeouts,
    broken connections and 408/425/429/5xx are tried again, `retries` times, after a short backoff."""
    failure = ("fetch_failed", f"{url}: not fetched")
    attempts = 0
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(FETCH_BACKOFF_S * 2 ** (attempt - 1))
        attempts += 1
        try:
            request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            if err.code in GONE:
                raise Rejected("missing_image", f"{url} answered HTTP {err.code} {err.reason}") from None
            failure = ("fetch_failed", f"{url} answered HTTP {err.code} {err.reason}")
            if err.code not in RETRIED:
                break
        except urllib.error.URLError as err:  # no connection: refused, unknown host, TLS
            if isinstance(err.reason, TimeoutError):
                failure = ("fetch_timeout", f"{url}: no answer within {timeout:g} s")
            else:
                failure = ("fetch_failed", f"{url}: cannot connect ({err.reason})")
        except TimeoutError:
            failure = ("fetch_timeout", f"{url}: no answer within {timeout:g} s")
        except (http.client.HTTPException, OSError) as err:  # the connection broke mid-answer
            failure = ("fetch_failed", f"{url}: the connection broke ({type(err).__name__})")
        except ValueError as err:  # not a URL urllib can open
            raise Rejected("fetch_failed", f"{url}: not a valid URL ({err})") from None
    raise Rejected(failure[0], f"{failure[1]} ({attempts} attempt{'s' if attempts > 1 else ''})")


def read_checked(uri: str, max_pixels: int, data: bytes | None = None, fetch_timeout: float = FETCH_TIMEOUT_S,
                 fetch_retries: int = FETCH_RETRIES) -> Image.Image:
    """The decoded image of `uri` (its bytes read unless `data` holds them already; an http(s) URL
    is fetched, see `fetch_url`), or `Rejected`."""
    if data is None and is_url(uri):
        data = fetch_url(uri, fetch_timeout, fetch_retries)
    if data is None:
        try:
            data = read_bytes(uri)
        except FileNotFoundError as err:
            raise Rejected("missing_image", f"{uri} does not exist") from err
        except OSError as err:
            raise Rejected("unreadable_image", f"{uri}: {err}") from err
    return _open_checked(uri, data, max_pixels)


def load_image(uri: str, max_pixels: int, max_side: int, image_format: str, data: bytes | None = None,
               fetch_timeout: float = FETCH_TIMEOUT_S, fetch_retries: int = FETCH_RETRIES) -> tuple[bytes, int, int]:
    """(re-encoded bytes, original width, original height) or `Rejected`."""
    image = read_checked(uri, max_pixels, data, fetch_timeout, fetch_retries)
    return reencode(image, max_side, image_format), image.width, image.height


def decode_stage(batch: pa.Table, max_pixels: int, max_side: int, image_format: str,
                 fetch_timeout: float = FETCH_TIMEOUT_S, fetch_retries: int = FETCH_RETRIES) -> pa.Table:
    """Ray Data stage: adds (or replaces) image, width, height; sets reject_reason/detail for bad
    images. An `image` column already there holds the source's bytes (a WebDataset sample's), read
    instead of `image_uri` where not null."""
    images, widths, heights = [], [], []
    reasons, details = batch["reject_reason"].to_pylist(), batch["reject_detail"].to_pylist()
    given = batch["image"].to_pylist() if "image" in batch.column_names else [None] * batch.num_rows
    for row, uri in enumerate(batch["image_uri"].to_pylist()):
        try:
            if reasons[row]:
                raise Rejected(reasons[row], details[row])
            data, width, height = load_image(uri, max_pixels, max_side, image_format, given[row],
                                             fetch_timeout, fetch_retries)
            images.append(data), widths.append(width), heights.append(height)
        except Rejected as rejected:
            images.append(None), widths.append(None), heights.append(None)
            reasons[row], details[row] = rejected.reason, rejected.detail
    batch = batch.drop_columns([c for c in ("image",) if c in batch.column_names])
    return (batch.drop_columns(["reject_reason", "reject_detail"])
            .append_column("image", pa.array(images, pa.binary()))
            .append_column("width", pa.array(widths, pa.int32()))
            .append_column("height", pa.array(heights, pa.int32()))
            .append_column("reject_reason", pa.array(reasons, pa.string()))
            .append_column("reject_detail", pa.array(details, pa.string())))
