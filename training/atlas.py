"""The feature atlas: a static page over a feature index (:mod:`sae_core.feature_index`).

:func:`write_atlas` reads a complete index and writes a page that opens offline: an ``index.html`` with inline
CSS and no scripts, a firing-frequency histogram, one PNG strip per shown feature (its top images, each with a
heatmap of where it fired, on one colour scale: the feature's top peak), and ``atlas.json`` with the same
statistics. ``training.atlas_run`` builds the index (generating the images) and then calls this.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

from sae_core.atomic import atomic_write
from sae_core.feature_index import FeatureIndex
from sae_core.metrics import firing_histogram
from sae_core.plots import histogram_chart

PAD, LABEL_H = 4, 14

_CSS = """
body { font-family: sans-serif; margin: 24px; color: #222; background: #fafafa; }
header { margin-bottom: 16px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: white; border: 1px solid #ddd; border-radius: 6px; padding: 8px 12px; max-width: 100%; }
.card h2 { font-size: 16px; margin: 4px 0; }
.card p { margin: 4px 0; font-size: 13px; }
.card img { display: block; max-width: 100%; }
.card ol { font-size: 12px; color: #555; margin: 4px 0; padding-left: 20px; }
.score { color: #888; }
"""


def write_atlas(index: FeatureIndex, out_dir: Path, title: str, site_name: Optional[str] = None,
                n_features: Optional[int] = None, min_images: int = 1) -> Path:
    """Write out_dir/index.html (+ out_dir/features/*.png, out_dir/atlas.json) and return the index.html path.

    Shown: features that fired in >= ``min_images`` images, most images first (then most frequent, then id),
    the first ``n_features`` of them when given. ``site_name`` defaults to the dictionary's site."""
    out_dir = Path(out_dir)
    site_name = site_name or str(index.header["dictionary"]["site"])
    counts = index.header["counts"]
    summary = index.summary()
    frequency = np.asarray(summary["frequency"], dtype=np.float64)
    images = np.asarray(summary["images"], dtype=np.int64)
    ids = np.arange(index.n_latents)
    dead = ids[images == 0]
    eligible = ids[images >= max(min_images, 1)]
    shown = eligible[np.lexsort((eligible, -frequency[eligible], -images[eligible]))][:n_features].tolist()

    edges, bars = firing_histogram(torch.from_numpy(frequency))
    chart = histogram_chart(edges, bars, "Firing frequency of all features (dead ones in the first bin)",
                            "log10 firing frequency")
    atomic_write(out_dir / "firing_histogram.png", lambda tmp: chart.save(tmp, format="PNG"))
    cards, features = [], {}
    for f in shown:
        record = index.feature(f)
        rel = f"features/f{f:05d}.png"
        strip = _strip(index, record)
        atomic_write(out_dir / rel, lambda tmp: strip.save(tmp, format="PNG"))
        cards.append(_card(record, counts["images"], rel))
        features[str(f)] = {"strip": rel, "words": record["words"],
                            "top_images": [[t["image"], t["peak"], t["prompt"]] for t in record["top"]]}

    n_dead = len(dead)
    line = (f"{index.n_latents - n_dead} of {index.n_latents} features fired; {n_dead} dead. "
            f"Showing {len(cards)}: fired in at least {max(min_images, 1)} image(s), most images first.")
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n<header><h1>{html.escape(title)}</h1>"
            f"<p>site <code>{html.escape(site_name)}</code> &middot; {counts['images']} images &middot; "
            f"{counts['tokens']} tokens &middot; top {index.top_m} images per feature</p>"
            f"<p>{html.escape(line)}</p>"
            f'<img src="firing_histogram.png" alt="firing frequency histogram"></header>\n'
            f'<div class="cards">\n' + "\n".join(cards) + "\n</div></body></html>\n")
    stats = {
        "title": title, "site": site_name, "n_images": counts["images"], "n_tokens": counts["tokens"],
        "n_latents": index.n_latents, "top_m": index.top_m, "dead": dead.tolist(),
        "frequency": summary["frequency"], "mean_activation": summary["mean"], "images_fired": summary["images"],
        "features": features,
    }
    atomic_write(out_dir / "atlas.json", lambda tmp: Path(tmp).write_text(json.dumps(stats), encoding="utf-8"))
    page_path = out_dir / "index.html"
    atomic_write(page_path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return page_path


def _strip(index: FeatureIndex, record: dict[str, Any]) -> Image.Image:
    """The feature's top images side by side, each over its peak; one colour scale (the top peak) for all."""
    top = record["top"]
    tiles = [index.tile(record["id"], rank, scale_max=top[0]["peak"]) for rank in range(len(top))]
    width = PAD + sum(t.width + PAD for t in tiles)
    canvas = Image.new("RGB", (width, 2 * PAD + max(t.height for t in tiles) + LABEL_H), "white")
    draw = ImageDraw.Draw(canvas)
    x = PAD
    for entry, tile in zip(top, tiles):
        canvas.paste(tile, (x, PAD))
        draw.rectangle([x - 1, PAD - 1, x + tile.width, PAD + tile.height], outline=(160, 160, 160))
        draw.text((x, PAD + tile.height + 2), f"{entry['peak']:.3g}  #{entry['image']}", fill="black")
        x += tile.width + PAD
    return canvas


def _card(record: dict[str, Any], n_images: int, strip: str) -> str:
    f = record["id"]
    word_text = ", ".join(f'{html.escape(w)} <span class="score">{s:+.3g}</span>' for w, s in record["words"])
    prompts = "".join(f"<li>#{t['image']} ({t['peak']:.3g}): {html.escape(t['prompt'])}</li>" for t in record["top"])
    return (f'<div class="card" id="f{f}"><h2>feature {f}</h2>'
            f"<p>firing frequency {record['frequency']:.3g} &middot; mean activation {record['mean']:.3g} &middot; "
            f"fired in {record['images']} of {n_images} images</p>"
            f"<p>words: {word_text or '<i>none stands out</i>'}</p>"
            f'<img src="{strip}" alt="top images of feature {f}"><ol>{prompts}</ol></div>')
