"""Figures of an image with labelled boxes or a similarity heatmap, as PNG bytes (jobs.predict,
jobs.demo).

Built on matplotlib's `Figure` directly, not pyplot: no global backend is switched, no window can
open, and a figure is freed as soon as it is dropped, so a job may draw many.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle
from PIL import Image

# Distinct colours for boxes that carry no meaning of their own (matplotlib's tab10).
BOX_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf")
PANEL_INCHES = 5.0
# A larger image is shown from a copy this large: a figure a few inches wide shows no more, and
# matplotlib would otherwise resample every pixel of a photo of tens of megapixels.
DISPLAY_SIDE = 1024


def image_figure(image: Image.Image, rows: int = 1, columns: int = 1,
                 panel_inches: float = PANEL_INCHES) -> tuple[Figure, np.ndarray]:
    """A figure of rows x columns panels, each `panel_inches` wide and shaped like `image`, and its
    (rows, columns) axes."""
    width, height = image.size
    panel_height = panel_inches * min(max(height / width, 0.3), 3.0)
    figure = Figure(figsize=(panel_inches * columns, panel_height * rows + 0.6), layout="constrained")
    return figure, figure.subplots(rows, columns, squeeze=False)


def _show(axis: Axes, image: Image.Image) -> None:
    """The image in its own pixel coordinates (x right, y down), whatever size it is shown at."""
    shown = image
    if max(image.size) > DISPLAY_SIDE:
        shown = image.copy()
        shown.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE))
    axis.imshow(shown, extent=(0, image.width, image.height, 0))
    axis.set_axis_off()


def show_boxes(axis: Axes, image: Image.Image, boxes: Sequence[Sequence[float]], texts: Sequence[str],
               colours: Sequence[str]) -> None:
    """`image` with each normalised [x0, y0, x1, y1] box outlined in its colour and its text on a
    tag of that colour inside its top corner nearer the image's centre, so that tags of boxes near
    an edge stay in view."""
    _show(axis, image)
    for (x0, y0, x1, y1), text, colour in zip(boxes, texts, colours):
        left, top = x0 * image.width, y0 * image.height
        axis.add_patch(Rectangle((left, top), (x1 - x0) * image.width, (y1 - y0) * image.height, fill=False,
                                 edgecolor=colour, linewidth=2))
        on_left = x0 + x1 < 1
        axis.text(left if on_left else x1 * image.width, top, text, fontsize=8, color="white",
                  ha="left" if on_left else "right", va="top", clip_on=True,
                  bbox={"facecolor": colour, "alpha": 0.85, "pad": 1.5, "edgecolor": "none"})


def show_heatmap(axis: Axes, image: Image.Image, heat: np.ndarray) -> AxesImage:
    """`image` under a half-transparent (h, w) map whose cells cover an h x w grid of it, upsampled
    bilinearly; returns the map's artist for a colour bar."""
    _show(axis, image)
    return axis.imshow(heat, extent=(0, image.width, image.height, 0), cmap="inferno", alpha=0.6,
                       interpolation="bilinear")


def png_bytes(figure: Figure, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
