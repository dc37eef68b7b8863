"""Charts: training curves, firing histograms, top-feature bars, drawn with matplotlib.

Nodes show them as preview images and the CLI writes them as PNGs, so every function returns a PIL
image. matplotlib is imported when a chart is drawn (with the non-interactive Agg backend), never at
import time: the engine stays cheap to import and usable where no chart is asked for.
"""
from __future__ import annotations

import io
import itertools
from typing import Any, Sequence

from PIL import Image

SIZE = (6.4, 3.6)  # inches at DPI: 640 x 360 pixels
DPI = 100
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _to_image(fig: Any) -> Image.Image:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    buffer.seek(0)
    with Image.open(buffer) as image:
        return image.convert("RGB")


def series_styles(n: int) -> list[dict[str, Any]]:
    """``n`` distinct (colour, line style, marker) triples: colours first, then styles, so no two series match."""
    colours = [f"C{i}" for i in range(10)]
    triples = itertools.product(LINE_STYLES, colours)
    return [{"color": colour, "linestyle": style, "marker": MARKERS[i % len(MARKERS)]}
            for i, (style, colour) in zip(range(n), triples)]


def line_chart(series: dict[str, Sequence[tuple[float, float]]], title: str, x_label: str = "step",
               y_label: str = "value", log_y: bool = False) -> Image.Image:
    """Curves ``{name: [(x, y), ...]}`` on shared axes, each in its own style, the legend beside the axes
    (``log_y`` for losses spanning decades)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZE)
    drawn = False
    for (name, points), style in zip(series.items(), series_styles(len(series))):
        kept = [(x, y) for x, y in points if not log_y or y > 0]
        if kept:
            xs, ys = zip(*kept)
            ax.plot(xs, ys, label=name, markersize=4, markevery=max(1, len(xs) // 12), **style)
            drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    if log_y and drawn:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=x_label, ylabel=y_label)
    ax.grid(alpha=0.3)
    if drawn and len(series) > 1:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    return _to_image(fig)


def histogram_chart(edges: Sequence[float], counts: Sequence[int], title: str, x_label: str,
                    y_label: str = "features", log_x: bool = False) -> Image.Image:
    """Bars for a histogram given its bin edges and counts (``log_x`` for log-spaced bins)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZE)
    edges = list(edges)
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    ax.bar(edges[:-1], list(counts), width=widths, align="edge", color="C0", edgecolor="white")
    if log_x:
        ax.set_xscale("log")
    ax.set(title=title, xlabel=x_label, ylabel=y_label)
    ax.grid(axis="y", alpha=0.3)
    return _to_image(fig)


def bar_chart(labels: Sequence[str], values: Sequence[float], title: str, x_label: str = "value") -> Image.Image:
    """Horizontal labelled bars, first label on top, each with its value."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(SIZE[0], max(1.6, 0.35 * len(labels) + 0.9)))
    positions = list(range(len(labels)))[::-1]
    bars = ax.barh(positions, list(values), color="C0")
    ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], padding=3, fontsize="small")
    ax.set_yticks(positions, list(labels))
    ax.set(title=title, xlabel=x_label)
    ax.margins(x=0.15)
    return _to_image(fig)


def heatmap_chart(values: Any, row_labels: Sequence[str], col_labels: Sequence[str], title: str, x_label: str,
                  y_label: str, value_format: str = "{:.2f}", vmin: float | None = None, vmax: float | None = None,
                  colorbar_label: str = "accuracy") -> Image.Image:
    """A (rows, columns) grid of numbers as coloured cells, each written in, so a reader sees where the values
    peak without reading the legend and can still read every value exactly; the text is dark on light cells and
    light on dark ones (NaN cells stay blank)."""
    import numpy as np

    plt = _pyplot()
    grid = np.asarray(values, dtype=float).reshape(len(row_labels), len(col_labels))
    width = min(16.0, max(SIZE[0], 1.6 + 0.85 * len(col_labels) + 0.07 * max(map(len, row_labels), default=0)))
    fig, ax = plt.subplots(figsize=(width, max(2.4, 1.4 + 0.32 * len(row_labels))))
    image = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(col_labels)), list(col_labels))
    ax.set_yticks(range(len(row_labels)), list(row_labels))
    ax.tick_params(labelsize="small")
    low, high = image.norm.vmin, image.norm.vmax
    for (row, col), value in np.ndenumerate(grid):
        if np.isfinite(value):
            shade = (value - low) / (high - low) if high > low else 0.5
            ax.text(col, row, value_format.format(value), ha="center", va="center", fontsize="small",
                    color="black" if shade > 0.55 else "white")
    ax.set(title=title, xlabel=x_label, ylabel=y_label)
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    bar_axes = make_axes_locatable(ax).append_axes("right", size=0.2, pad=0.15)  # as tall as the grid, whatever its rows
    fig.colorbar(image, cax=bar_axes, label=colorbar_label)
    return _to_image(fig)
