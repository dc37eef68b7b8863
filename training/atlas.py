"""The feature atlas of a trained dictionary: on which images, where, and with which words each feature fires.

Images stream through :class:`AtlasAccumulator` one at a time (``training.atlas_run`` generates them; real
images work the same); :meth:`AtlasAccumulator.write` then writes a static page that opens offline: an
``index.html`` with inline CSS and no scripts, a firing-frequency histogram, one PNG strip per shown feature
(its top images, with a heatmap of where it fired), and ``atlas.json`` with the same statistics.

Memory does not grow with latents x images:

* per latent: token and image counts, activation sums and a ``top_m`` list of (peak, image id),
  about ``n_latents * (12 * top_m + 32)`` bytes;
* per image, only while it sits in some feature's top list: a thumbnail (longest side <= 256 px) and its
  (token, latent, value) entries for exactly those features, pruned when it drops out of a list;
* per word: an image count for every word, and a float32 sum of per-image peaks over all latents for the
  first ``VOCAB`` distinct words seen, ``VOCAB * n_latents * 4`` bytes (100 MB at 50k latents).
"""
from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from sae_core.atomic import atomic_write
from sae_core import ConfigError, DictionaryError, InputError, SparseCodes
from sae_core.metrics import firing_histogram
from sae_core.plots import histogram_chart

VOCAB = 500
"""Words that get per-latent sums (the first seen); later words are only counted."""
TOP_WORDS = 5
THUMB_MAX = 256
"""Longest side of a kept image: strips need no more, and it bounds memory for large generations."""
MIN_TILE = 96
"""Images smaller than this are enlarged (nearest) so that a person can see them."""
PAD, LABEL_H = 4, 14
ALPHA_COLD, ALPHA_HOT = 0.25, 0.75
WORD_NOISE = 1e-3
"""Word scores below this fraction of the feature's top peak are float32 rounding in the sums, not association."""
WORD_CHUNK = 1024
"""Features scored against the vocabulary at once, bounding the (words, features) score matrix."""
STOP_WORDS = frozenset("a an the of on in and with at to for by from is are or as it its this that".split())

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


@dataclass
class _Kept:
    """An image held because it is in some top list, with the entries of exactly those features."""

    pixels: np.ndarray
    """(h, w, 3) uint8 thumbnail."""
    prompt: str
    grid: tuple[int, int] | None
    n_tokens: int
    token: Tensor
    latent: Tensor
    value: Tensor


class AtlasAccumulator:
    """Streaming per-feature statistics and top images; see the module docstring for memory."""

    def __init__(self, n_latents: int, top_m: int = 8):
        if n_latents < 1 or top_m < 1:
            raise ConfigError(f"an atlas needs n_latents >= 1 and top_m >= 1, got {n_latents} and {top_m}")
        self.n_latents, self.top_m = n_latents, top_m
        self.n_images = self.n_tokens = 0
        self.fire_count = torch.zeros(n_latents, dtype=torch.float64)
        self.activation_sum = torch.zeros(n_latents, dtype=torch.float64)
        self.images_fired = torch.zeros(n_latents, dtype=torch.int64)
        self.peak_sum = torch.zeros(n_latents, dtype=torch.float64)
        # empty slots hold peak 0 and image -1, so any image on which a feature fires enters a list not yet full
        self.top_peak = torch.zeros(n_latents, top_m)
        self.top_image = torch.full((n_latents, top_m), -1, dtype=torch.int64)
        self.word_images: dict[str, int] = {}
        self.word_peak_sum: dict[str, Tensor] = {}
        self._kept: dict[int, _Kept] = {}

    @property
    def kept_images(self) -> int:
        """How many images are held now (those in some feature's top list)."""
        return len(self._kept)

    def add(self, image: np.ndarray, prompt: str, codes: SparseCodes, grid: tuple[int, int] | None) -> int:
        """One generated (or real) image: ``image`` uint8 (H, W) or (H, W, 3); ``codes`` (T, k) of its site
        tokens, one row per token; ``grid`` (rows, cols) when the tokens are a row-major spatial grid, else
        None. Returns the image's id (0, 1, 2, ...)."""
        pixels = _check_image(image)
        values = codes.values.detach().to("cpu", torch.float32)
        indices = codes.indices.detach().to("cpu", torch.int64)
        if values.ndim != 2 or values.shape != indices.shape:
            raise InputError(f"atlas codes must be (tokens, k) values and indices of one shape, got values "
                                  f"{tuple(values.shape)} and indices {tuple(indices.shape)}")
        n_tokens = values.shape[0]
        if grid is not None:
            grid = (int(grid[0]), int(grid[1]))
            if grid[0] * grid[1] != n_tokens:
                raise InputError(f"grid {grid} has {grid[0] * grid[1]} cells but the codes have {n_tokens} "
                                      f"tokens (values {tuple(values.shape)}); pass grid=None for tokens that are "
                                      f"not a spatial grid")
        active = values > 0
        token, latent, value = active.nonzero()[:, 0], indices[active], values[active]
        if latent.numel() and (int(latent.min()) < 0 or int(latent.max()) >= self.n_latents):
            bad = int(latent[(latent < 0) | (latent >= self.n_latents)][0])
            raise DictionaryError(f"latent index {bad} is out of range for an atlas of {self.n_latents} latents: "
                                  f"were these codes made by another dictionary?")

        image_id = self.n_images
        self.n_images += 1
        self.n_tokens += n_tokens
        self.fire_count += torch.bincount(latent, minlength=self.n_latents)
        self.activation_sum.index_add_(0, latent, value.double())
        peak = torch.zeros(self.n_latents).scatter_reduce_(0, latent, value, "amax")
        fired = peak.nonzero().squeeze(1)
        fired_peak = peak[fired]
        self.images_fired[fired] += 1
        self.peak_sum[fired] += fired_peak.double()
        for word in sorted(_words(prompt)):
            self.word_images[word] = self.word_images.get(word, 0) + 1
            sums = self.word_peak_sum.get(word)
            if sums is None and len(self.word_peak_sum) < VOCAB:
                sums = self.word_peak_sum[word] = torch.zeros(self.n_latents)
            if sums is not None:
                sums[fired] += fired_peak

        # a top list is a heap of top_m: the image replaces the list's weakest entry when it beats it
        low, slot = self.top_peak[fired].min(1)
        enters = fired_peak > low
        rows, slot = fired[enters], slot[enters]
        evicted = self.top_image[rows, slot]
        self.top_peak[rows, slot] = fired_peak[enters]
        self.top_image[rows, slot] = image_id
        self._forget(evicted, rows)
        if rows.numel():
            keep = torch.isin(latent, rows)
            self._kept[image_id] = _Kept(_thumbnail(pixels), prompt, grid, n_tokens,
                                         token[keep], latent[keep], value[keep])
        return image_id

    def _forget(self, evicted: Tensor, rows: Tensor) -> None:
        """Drop the entries of features whose lists no longer hold an image, and images no list holds."""
        held = evicted >= 0
        evicted, rows = evicted[held], rows[held]
        order = evicted.argsort()
        ids, counts = torch.unique_consecutive(evicted[order], return_counts=True)
        for image_id, lost in zip(ids.tolist(), rows[order].split(counts.tolist())):
            kept = self._kept[image_id]
            stay = ~torch.isin(kept.latent, lost)
            if stay.any():
                kept.token, kept.latent, kept.value = kept.token[stay], kept.latent[stay], kept.value[stay]
            else:
                del self._kept[image_id]

    def write(self, out_dir: Path, title: str, site_name: str, n_features: int | None = None,
              min_images: int = 1) -> Path:
        """Write out_dir/index.html (+ out_dir/features/*.png, out_dir/atlas.json) and return the index path.

        Shown: features that fired in >= ``min_images`` images, most images first (then most frequent),
        the first ``n_features`` of them when given."""
        out_dir = Path(out_dir)
        (out_dir / "features").mkdir(parents=True, exist_ok=True)
        frequency = (self.fire_count / max(self.n_tokens, 1)).float()
        mean_activation = (self.activation_sum / self.fire_count.clamp_min(1)).float()
        dead = (self.images_fired == 0).nonzero().squeeze(1)
        eligible = (self.images_fired >= max(min_images, 1)).nonzero().squeeze(1)
        eligible = eligible[frequency[eligible].argsort(descending=True, stable=True)]
        shown = eligible[self.images_fired[eligible].argsort(descending=True, stable=True)][:n_features]

        edges, counts = firing_histogram(frequency)
        chart = histogram_chart(edges, counts, "Firing frequency of all features (dead ones in the first bin)",
                                "log10 firing frequency")
        atomic_write(out_dir / "firing_histogram.png", lambda tmp: chart.save(tmp, format="PNG"))
        cards, features = [], {}
        for f, words in zip(shown.tolist(), self._word_scores(shown)):
            tops = self._top_images(f)
            strip = self._strip(f, tops)
            rel = f"features/f{f:05d}.png"
            atomic_write(out_dir / rel, lambda tmp: strip.save(tmp, format="PNG"))
            cards.append(self._card(f, float(frequency[f]), float(mean_activation[f]), words, tops, rel))
            features[str(f)] = {"strip": rel, "words": [[w, _round(s)] for w, s in words],
                                "top_images": [[i, _round(p), self._kept[i].prompt] for i, p in tops]}

        n_dead = dead.numel()
        summary = (f"{self.n_latents - n_dead} of {self.n_latents} features fired; {n_dead} dead. "
                   f"Showing {len(cards)}: fired in at least {max(min_images, 1)} image(s), most images first.")
        page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
                f"<style>{_CSS}</style></head><body>\n<header><h1>{html.escape(title)}</h1>"
                f"<p>site <code>{html.escape(site_name)}</code> &middot; {self.n_images} images &middot; "
                f"{self.n_tokens} tokens &middot; top {self.top_m} images per feature</p>"
                f"<p>{html.escape(summary)}</p>"
                f'<img src="firing_histogram.png" alt="firing frequency histogram"></header>\n'
                f'<div class="cards">\n' + "\n".join(cards) + "\n</div></body></html>\n")
        stats = {
            "title": title, "site": site_name, "n_images": self.n_images, "n_tokens": self.n_tokens,
            "n_latents": self.n_latents, "top_m": self.top_m, "dead": dead.tolist(),
            "frequency": [_round(v) for v in frequency.tolist()],
            "mean_activation": [_round(v) for v in mean_activation.tolist()],
            "images_fired": self.images_fired.tolist(),
            "features": features,
        }
        atomic_write(out_dir / "atlas.json", lambda tmp: Path(tmp).write_text(json.dumps(stats), encoding="utf-8"))
        index = out_dir / "index.html"
        atomic_write(index, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
        return index

    def _top_images(self, feature: int) -> list[tuple[int, float]]:
        """(image id, peak) of a feature's list, strongest first, earlier image first on ties."""
        pairs = zip(self.top_image[feature].tolist(), self.top_peak[feature].tolist())
        return sorted(((i, p) for i, p in pairs if i >= 0), key=lambda ip: (-ip[1], ip[0]))

    def _word_scores(self, features: Tensor) -> list[list[tuple[str, float]]]:
        """Per feature, the words whose images it fires on more than on the rest: mean per-image peak with the
        word minus without it, over words in >= 2 images (and not in all), best first, clearly positive only."""
        words = [w for w in self.word_peak_sum if 2 <= self.word_images[w] < self.n_images]
        if not words:
            return [[] for _ in range(features.numel())]
        count = torch.tensor([self.word_images[w] for w in words], dtype=torch.float64)[:, None]
        result = []
        for chunk in features.split(WORD_CHUNK):
            with_sum = torch.stack([self.word_peak_sum[w][chunk] for w in words]).double()
            score = with_sum / count - (self.peak_sum[chunk] - with_sum) / (self.n_images - count)
            best = score.topk(min(TOP_WORDS, len(words)), dim=0)
            floors = (WORD_NOISE * self.top_peak[chunk].amax(1)).tolist()
            for values, rows, floor in zip(best.values.T.tolist(), best.indices.T.tolist(), floors):
                result.append([(words[r], v) for v, r in zip(values, rows) if v > floor])
        return result

    def _strip(self, feature: int, tops: list[tuple[int, float]]) -> Image.Image:
        """The feature's top images side by side, each over its peak; one colour scale (the top peak) for all."""
        tiles = [self._tile(feature, i, tops[0][1]) for i, _ in tops]
        width = PAD + sum(t.width + PAD for t in tiles)
        canvas = Image.new("RGB", (width, 2 * PAD + max(t.height for t in tiles) + LABEL_H), "white")
        draw = ImageDraw.Draw(canvas)
        x = PAD
        for (image_id, peak), tile in zip(tops, tiles):
            canvas.paste(tile, (x, PAD))
            draw.rectangle([x - 1, PAD - 1, x + tile.width, PAD + tile.height], outline=(160, 160, 160))
            draw.text((x, PAD + tile.height + 2), f"{peak:.3g}  #{image_id}", fill="black")
            x += tile.width + PAD
        return canvas

    def _tile(self, feature: int, image_id: int, scale_max: float) -> Image.Image:
        """An image, enlarged when small, with the feature's per-token activation over it when tokens form a grid."""
        kept = self._kept[image_id]
        h, w = kept.pixels.shape[:2]
        scale = max(1, -(-MIN_TILE // max(h, w)))
        base = kept.pixels.repeat(scale, 0).repeat(scale, 1)
        if kept.grid is None:
            return Image.fromarray(base)
        mine = kept.latent == feature
        act = torch.zeros(kept.n_tokens).index_put_((kept.token[mine],), kept.value[mine], accumulate=True)
        cells = (act / max(scale_max, 1e-12)).clamp(0, 1).reshape(kept.grid).numpy()
        heat = Image.fromarray(cells).resize((w * scale, h * scale), Image.BILINEAR)
        return Image.fromarray(_overlay(base, np.clip(np.asarray(heat), 0.0, 1.0)))

    def _card(self, feature: int, frequency: float, mean_activation: float, words: list[tuple[str, float]],
              tops: list[tuple[int, float]], strip: str) -> str:
        word_text = ", ".join(f'{html.escape(w)} <span class="score">{s:+.3g}</span>' for w, s in words)
        prompts = "".join(f"<li>#{i} ({p:.3g}): {html.escape(self._kept[i].prompt)}</li>" for i, p in tops)
        return (f'<div class="card" id="f{feature}"><h2>feature {feature}</h2>'
                f"<p>firing frequency {frequency:.3g} &middot; mean activation {mean_activation:.3g} &middot; "
                f"fired in {int(self.images_fired[feature])} of {self.n_images} images</p>"
                f"<p>words: {word_text or '<i>none stands out</i>'}</p>"
                f'<img src="{strip}" alt="top images of feature {feature}"><ol>{prompts}</ol></div>')


def _words(prompt: str) -> set[str]:
    """A prompt's distinct lowercase words, letters only, stop words dropped."""
    return set(re.findall(r"[a-z]+", prompt.lower())) - STOP_WORDS


def _check_image(image: np.ndarray) -> np.ndarray:
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8 or not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] == 3)):
        raise InputError(f"an atlas image must be uint8 (H, W) or (H, W, 3), got {pixels.dtype} {pixels.shape}")
    return pixels


def _thumbnail(pixels: np.ndarray) -> np.ndarray:
    """RGB copy whose longest side is at most THUMB_MAX."""
    image = Image.fromarray(pixels).convert("RGB")
    if max(image.size) > THUMB_MAX:
        image.thumbnail((THUMB_MAX, THUMB_MAX), Image.BILINEAR)
    return np.asarray(image).copy()


def _overlay(base: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """``heat`` in [0, 1] as a black -> red -> yellow ramp blended over ``base`` (h, w, 3) uint8, more opaque
    where hotter so that the image stays readable where the feature is silent."""
    colour = np.stack([np.clip(2 * heat, 0, 1), np.clip(2 * heat - 1, 0, 1), np.zeros_like(heat)], -1) * 255
    alpha = (ALPHA_COLD + (ALPHA_HOT - ALPHA_COLD) * heat)[..., None]
    return (base * (1 - alpha) + colour * alpha).round().astype(np.uint8)


def _round(v: float) -> float:
    return float(f"{v:.6g}")
