"""Image grids with labels: how a person compares many generated images at a glance."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

MIN_CELL = 96


def image_grid(images: Tensor, row_labels: Sequence[str], col_labels: Sequence[str], title: str = "") -> Image.Image:
    """``images`` (rows, cols, C, H, W) in [0, 1] -> one labelled RGB picture; small images are enlarged."""
    rows, cols, channels, h, w = images.shape
    scale = max(1, -(-MIN_CELL // max(h, w)))
    cell_h, cell_w = h * scale, w * scale
    left = 8 + 7 * max((len(s) for s in row_labels), default=0)
    top = 20 + (18 if title else 0)
    canvas = Image.new("RGB", (left + cols * (cell_w + 4), top + rows * (cell_h + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill="black")
    for c, label in enumerate(col_labels):
        draw.text((left + c * (cell_w + 4), top - 16), label, fill="black")
    pixels = (images.clamp(0, 1) * 255).round().byte()
    if channels == 1:
        pixels = pixels.expand(-1, -1, 3, -1, -1)
    for r in range(rows):
        draw.text((4, top + r * (cell_h + 4) + cell_h // 2 - 6), row_labels[r], fill="black")
        for c in range(cols):
            tile = Image.fromarray(np.ascontiguousarray(pixels[r, c].permute(1, 2, 0).numpy()))
            canvas.paste(tile.resize((cell_w, cell_h), Image.NEAREST), (left + c * (cell_w + 4), top + r * (cell_h + 4)))
    return canvas
