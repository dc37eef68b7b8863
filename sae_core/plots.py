"""Small charts drawn with Pillow alone: training curves, firing histograms, top-feature bars.

Nodes show them as preview images and the CLI writes them as PNGs; no
plotting library is needed, so they work in any ComfyUI install.
"""
from __future__ import annotations

import math
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
WIDTH, HEIGHT, MARGIN = 640, 360, 56


def _frame(title: str) -> tuple[Image.Image, ImageDraw.ImageDraw, ImageFont.ImageFont]:
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((MARGIN, 12), title, fill="black", font=font)
    draw.rectangle([MARGIN, MARGIN, WIDTH - 16, HEIGHT - MARGIN], outline=(90, 90, 90))
    return image, draw, font


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def line_chart(series: dict[str, Sequence[tuple[float, float]]], title: str, x_label: str = "step",
               log_y: bool = False) -> Image.Image:
    """Curves ``{name: [(x, y), ...]}`` on shared axes (``log_y`` for losses spanning decades)."""
    image, draw, font = _frame(title)
    points = [(x, y) for pts in series.values() for x, y in pts if not log_y or y > 0]
    if not points:
        draw.text((WIDTH // 2 - 30, HEIGHT // 2), "no data", fill="gray", font=font)
        return image
    ty = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    xs, ys = [p[0] for p in points], [ty(p[1]) for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    left, top, right, bottom = MARGIN, MARGIN, WIDTH - 16, HEIGHT - MARGIN

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (ty(y) - y0) / (y1 - y0) * (bottom - top))

    for i, (name, pts) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        pixels = [to_px(x, y) for x, y in pts if not log_y or y > 0]
        if len(pixels) > 1:
            draw.line(pixels, fill=color, width=2)
        elif pixels:
            draw.ellipse([pixels[0][0] - 2, pixels[0][1] - 2, pixels[0][0] + 2, pixels[0][1] + 2], fill=color)
        draw.text((right - 150, top + 6 + 14 * i), name, fill=color, font=font)
    unty = (lambda v: 10 ** v) if log_y else (lambda v: v)
    draw.text((4, top), _fmt(unty(y1)), fill="black", font=font)
    draw.text((4, bottom - 10), _fmt(unty(y0)), fill="black", font=font)
    draw.text((left, bottom + 6), _fmt(x0), fill="black", font=font)
    draw.text((right - 40, bottom + 6), _fmt(x1), fill="black", font=font)
    draw.text(((left + right) // 2 - 10, bottom + 22), x_label, fill="black", font=font)
    return image


def histogram_chart(edges: Sequence[float], counts: Sequence[int], title: str, x_label: str) -> Image.Image:
    """Bars for a histogram given its bin edges and counts."""
    image, draw, font = _frame(title)
    left, top, right, bottom = MARGIN, MARGIN, WIDTH - 16, HEIGHT - MARGIN
    peak = max(max(counts), 1)
    width = (right - left) / max(len(counts), 1)
    for i, c in enumerate(counts):
        x = left + i * width
        draw.rectangle([x + 1, bottom - c / peak * (bottom - top), x + width - 1, bottom], fill=PALETTE[0])
    draw.text((4, top), str(peak), fill="black", font=font)
    draw.text((left, bottom + 6), _fmt(edges[0]), fill="black", font=font)
    draw.text((right - 30, bottom + 6), _fmt(edges[-1]), fill="black", font=font)
    draw.text(((left + right) // 2 - 40, bottom + 22), x_label, fill="black", font=font)
    return image


def bar_chart(labels: Sequence[str], values: Sequence[float], title: str) -> Image.Image:
    """Horizontal labelled bars, the longest as wide as the chart allows, each with its value."""
    width, bar = 480, 22
    image = Image.new("RGB", (width, 40 + bar * len(labels)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 8), title, fill="black")
    top = max(values, default=0) or 1.0
    for i, (label, value) in enumerate(zip(labels, values)):
        y = 32 + i * bar
        draw.text((8, y + 4), label, fill="black")
        draw.rectangle([90, y + 2, 90 + int((width - 170) * value / top), y + bar - 4], fill="#d62728")
        draw.text((width - 74, y + 4), f"{value:.3g}", fill="black")
    return image
