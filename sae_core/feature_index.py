"""The feature index of a dictionary: on which images, where, when and with which words each feature fires.

Built once per dictionary and stored beside it (``models/sae/<name>.features/``, see :func:`index_folder_for`) by
the ComfyUI node and the headless atlas alike, through :class:`FeatureIndexBuilder`; read page by page with
:func:`open_index`. Images stream through the builder one at a time and nothing holds all activations:

* per latent: token and image counts, sums, a ``top_m`` list of (peak, image id), an activation histogram and a
  guidance x timestep profile, ``n_latents * (12 * top_m + 8 * HISTOGRAM_BINS + 32 * (PROGRESS_BINS + 1) + 32)``
  bytes (34 MB at 50k latents and top 8);
* per image, only while it sits in some feature's top list: its (token, latent, value) entries for exactly those
  features (its thumbnail goes to disk at once and is deleted when no list holds it any more);
* per word: an image count for every word, and a float32 sum of per-image peaks over all latents for the first
  ``VOCAB`` distinct words seen, ``VOCAB * n_latents * 4`` bytes (100 MB at 50k latents).

Per image the builder takes the image, its prompt, the codes of its site tokens at one chosen model call (top
images, frequencies, histogram, words) and optionally the tallies of every call of its sampling (the timestep
profile over ``PROGRESS_BINS`` bins of sampling progress, and the cond/uncond profile). :class:`IndexProbe` is the
site function that produces both during a generation, whatever the runtime.

Folder layout (every file written atomically: temp file + ``os.replace``)::

    index.json                 format, version, complete flag, dictionary identity, build settings, counts, bins
    summary.json               columns over all features (frequency, images, mean, score, words, thumbnail):
                               what sorting and searching read, ~35 bytes per feature (1.7 MB at 50k)
    features/00000.json        full records of features 0..255; features/00256.json holds 256..511, ...
    images/000012.png          kept image 12's thumbnail (RGB, longest side <= THUMB_MAX), stored once however
                               many top lists hold it
    images/000012.safetensors  its (token, latent, value) entries for exactly the features whose lists hold it:
                               :meth:`FeatureIndex.heatmap` and :meth:`FeatureIndex.tile` render a feature's heatmap
                               over it on request, so an image in 30 lists costs one PNG, not 30 overlaid copies
    state.safetensors          only while building: the checkpoint a killed build resumes from
    labels.json                (written by :mod:`sae_core.labels`) feature labels; searched when present

Statistics (per feature ``f``, over the chosen call of every image unless said otherwise):

* ``frequency``: tokens on which ``f`` fired (activation > 0) / all tokens; ``images``: images on which it fired;
* ``mean``: mean activation over the tokens on which it fired; ``max``: its strongest per-image peak;
* ``histogram``: counts of its firing activations in ``HISTOGRAM_BINS`` log-spaced bins between
  ``HISTOGRAM_EDGES[0]`` (1e-3) and ``HISTOGRAM_EDGES[-1]`` (1e3), four per decade; values below the first edge
  count in the first bin, above the last in the last;
* ``timesteps``: over every tallied call, per bin of sampling progress (``PROGRESS_BINS`` equal bins of [0, 1]), the
  firing rate (fired tokens / tokens seen in that bin) and mean activation when firing; calls of unknown progress
  feed only ``guidance``; ``guidance``: the same for cond rows and uncond rows (rows of unknown guidance count as
  cond, as :func:`~sae_core.sites.context.prompt_rows` reads them);
* ``words``: the prompt words whose images it fires on more than the rest (mean per-image peak with the word minus
  without it, words in >= 2 images and not in all), best first; ``score``: the best word's score (0 when none);
* ``top``: its ``top_m`` images by peak, strongest first (earlier image first on ties).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from .atomic import atomic_write, save_safetensors_atomic
from .errors import ConfigError, DictionaryError, InputError, ScheduleError
from .kernels import SparseCodes
from .sites.context import SiteContext, prompt_rows
from .timesteps import in_window

FORMAT = "diffusion-sae-feature-index"
FORMAT_VERSION = 1
PAGE_SIZE = 256
"""Features per page file: a browser page of 256 features sorted by id is one file read."""
MAX_PAGE = 1024
VOCAB = 500
"""Words that get per-latent sums (the first seen); later words are only counted."""
TOP_WORDS = 5
THUMB_MAX = 256
"""Longest side of a stored thumbnail: tiles need no more, and it bounds the folder for large generations."""
MIN_TILE = 96
"""Thumbnails smaller than this are enlarged (nearest) in tiles so that a person can see them."""
ALPHA_COLD, ALPHA_HOT = 0.25, 0.75
WORD_NOISE = 1e-3
"""Word scores below this fraction of the feature's top peak are float32 rounding in the sums, not association."""
WORD_CHUNK = 1024
"""Features scored against the vocabulary at once, bounding the (words, features) score matrix."""
STOP_WORDS = frozenset("a an the of on in and with at to for by from is are or as it its this that".split())
HISTOGRAM_EDGES = tuple(float(10 ** (e / 4)) for e in range(-12, 13))
HISTOGRAM_BINS = len(HISTOGRAM_EDGES) - 1
PROGRESS_BINS = 10
GROUPS = ("cond", "uncond")
CONTENT_HASH_KEY = "content_sha256"
"""The dictionary file header's hash of its tensors, when the file has one: compared instead of hashing the decoder."""
SORTS = ("frequency", "images", "mean", "score", "id")
STATE = "state.safetensors"
OWN_NAMES = ("index.json", "summary.json", "features", "images", STATE)
LABELS = "labels.json"


# ----------------------------------------------------------------------------- dictionary identity


@dataclass(frozen=True)
class DictionaryIdentity:
    """Which dictionary an index describes: an index is only ever read with the dictionary it was built from."""

    file: Optional[str]
    kind: str
    site: str
    d_in: int
    n_latents: int
    fingerprint: str
    """``decoder-sha256:<hex>`` over the decoder rows (float32, with their shape)."""
    content_hash: Optional[str] = None
    """The dictionary file header's content hash, when it has one."""

    @classmethod
    def of(cls, dictionary: Any, path: Union[str, os.PathLike, None] = None) -> "DictionaryIdentity":
        """The identity of a loaded dictionary; ``path``, its file when known, names it and lends its header hash."""
        site = getattr(dictionary, "site", None)
        return cls(file=Path(path).name if path is not None else None, kind=str(getattr(dictionary, "kind", "")),
                   site=str(getattr(site, "name", site)), d_in=int(dictionary.d_in),
                   n_latents=int(dictionary.n_latents), fingerprint=decoder_fingerprint(dictionary),
                   content_hash=header_content_hash(path) if path is not None else None)

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "kind": self.kind, "site": self.site, "d_in": self.d_in,
                "n_latents": self.n_latents, "fingerprint": self.fingerprint, "content_hash": self.content_hash}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "DictionaryIdentity":
        return cls(file=data.get("file"), kind=str(data["kind"]), site=str(data["site"]), d_in=int(data["d_in"]),
                   n_latents=int(data["n_latents"]), fingerprint=str(data["fingerprint"]),
                   content_hash=data.get("content_hash"))

    def same_dictionary(self, other: "DictionaryIdentity") -> bool:
        """Same shapes and content: the header hashes when both have one, else the decoder fingerprints."""
        if (self.d_in, self.n_latents) != (other.d_in, other.n_latents):
            return False
        if self.content_hash and other.content_hash:
            return self.content_hash == other.content_hash
        return self.fingerprint == other.fingerprint


def decoder_fingerprint(dictionary: Any) -> str:
    """A hash of the decoder rows: two dictionaries with the same rows decode codes alike."""
    rows = dictionary.rows.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(json.dumps(list(rows.shape)).encode())
    digest.update(rows.numpy().tobytes())
    return f"decoder-sha256:{digest.hexdigest()}"


def header_content_hash(path: Union[str, os.PathLike]) -> Optional[str]:
    """The content hash a native dictionary file's header carries, without reading its tensors; None if none."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            value = (f.metadata() or {}).get(CONTENT_HASH_KEY)
    except (SafetensorError, OSError, ValueError):
        return None
    return f"{CONTENT_HASH_KEY}:{value}" if value else None


def index_folder_for(dictionary_path: Union[str, os.PathLike]) -> Path:
    """Where a dictionary's index lives: ``models/sae/x.safetensors`` -> ``models/sae/x.features``."""
    path = Path(dictionary_path)
    return path.with_name(path.stem + ".features")


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class CallTally:
    """One image's tokens at one model call, reduced to what the profiles need (a few KB instead of the codes)."""

    latent: Tensor
    """(n,) int64 distinct latents that fired."""
    fires: Tensor
    """(n,) int64 tokens on which each fired."""
    sums: Tensor
    """(n,) float64 sum of its activations."""
    tokens: int
    progress: Optional[float] = None
    sigma: Optional[float] = None
    cond: Optional[bool] = None
    """True for the prompt's (cond) rows, False for uncond rows, None when unknown (counted as cond)."""


def tally(codes: SparseCodes, progress: Optional[float] = None, sigma: Optional[float] = None,
          cond: Optional[bool] = None) -> CallTally:
    """Reduce one image's codes ``(tokens, k)`` at one call for the timestep and guidance profiles."""
    values, indices = _codes_cpu(codes)
    active = values > 0
    ids, inverse = torch.unique(indices[active], return_inverse=True)
    fires = torch.bincount(inverse, minlength=ids.numel())
    sums = torch.zeros(ids.numel(), dtype=torch.float64).index_add_(0, inverse, values[active].double())
    return CallTally(ids, fires, sums, int(values.shape[0]), _optional_float(progress), _optional_float(sigma),
                     None if cond is None else bool(cond))


def _codes_cpu(codes: SparseCodes) -> tuple[Tensor, Tensor]:
    values = codes.values.detach().to("cpu", torch.float32)
    indices = codes.indices.detach().to("cpu", torch.int64)
    if values.ndim != 2 or values.shape != indices.shape:
        raise InputError(f"index codes must be (tokens, k) values and indices of one shape, got values "
                         f"{tuple(values.shape)} and indices {tuple(indices.shape)}")
    if not torch.isfinite(values).all():
        raise InputError(f"index codes hold {int((~torch.isfinite(values)).sum())} NaN or inf value(s); the "
                         f"activations fed to the dictionary were not finite")
    return values, indices


def _optional_float(value: Optional[float]) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _check_image(image: np.ndarray) -> np.ndarray:
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8 or not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] == 3)):
        raise InputError(f"an index image must be uint8 (H, W) or (H, W, 3), got {pixels.dtype} {pixels.shape}")
    return pixels


def _words(prompt: str) -> set[str]:
    """A prompt's distinct lowercase words, letters only, stop words dropped."""
    return set(re.findall(r"[a-z]+", prompt.lower())) - STOP_WORDS


# ----------------------------------------------------------------------------- the probe


class IndexProbe:
    """The site function of an index build: call :meth:`begin` before each generation, :meth:`feed` after it.

    Each call's rows are encoded by ``dictionary`` on the activations' device (a copy is moved there once when the
    dictionary lives elsewhere); row ``r`` belongs to sample ``r % n_samples`` (batched guidance puts the uncond and
    cond halves in the order of the prompts). Every call of every row is tallied for the profiles (``profile=False``:
    none is, and only one call is encoded); the cond rows of the first call at progress >= ``at`` (any call when
    ``at`` is 0) are kept for the top images, as the atlas always read them."""

    def __init__(self, dictionary: Any, at: float = 0.5, profile: bool = True):
        if not 0.0 <= at <= 1.0:
            raise ConfigError(f"at={at}: the progress at which features are read lies in [0, 1]")
        self.dictionary, self.at, self.profile = dictionary, at, profile
        self.window = (at, 1.0) if at > 0 else None
        self._encoders: dict[torch.device, Any] = {dictionary.rows.device: dictionary}
        self.begin(1)

    def begin(self, n_samples: int) -> None:
        """Start a generation of ``n_samples`` images (what an earlier one left is dropped)."""
        if n_samples < 1:
            raise ConfigError(f"a generation has at least one sample, got n_samples={n_samples}")
        self.n_samples = n_samples
        self.chosen: dict[int, tuple[SparseCodes, Optional[tuple[int, int]], SiteContext]] = {}
        self.tallies: list[list[CallTally]] = [[] for _ in range(n_samples)]

    def __call__(self, h: Tensor, ctx: SiteContext) -> Tensor:
        choosing = len(self.chosen) < self.n_samples and in_window(ctx, self.window)
        if not (self.profile or choosing):
            return h
        cond_rows = set(prompt_rows(ctx, h.shape[0]).tolist())
        rows = list(range(h.shape[0])) if self.profile else sorted(cond_rows)
        codes = self._encode(h, rows)
        for j, row in enumerate(rows):
            sample = row % self.n_samples
            row_codes = SparseCodes(codes.values[j], codes.indices[j])
            if self.profile:
                cond = None if ctx.cond is None else bool(ctx.cond[row])
                self.tallies[sample].append(tally(row_codes, ctx.progress, ctx.sigma, cond))
            if choosing and row in cond_rows and sample not in self.chosen:
                self.chosen[sample] = (row_codes, ctx.grid, ctx)
        return h

    def _encode(self, h: Tensor, rows: list[int]) -> SparseCodes:
        if h.device not in self._encoders:
            self._encoders[h.device] = copy.deepcopy(self.dictionary).to(h.device)
        encoder = self._encoders[h.device]
        x = h.detach()[torch.tensor(rows, device=h.device)].to(encoder.rows.dtype)
        with torch.no_grad():
            codes = encoder.encode(x.reshape(-1, x.shape[-1]))
        shape = (len(rows), x.shape[1], -1)
        return SparseCodes(codes.values.detach().cpu().reshape(shape), codes.indices.detach().cpu().reshape(shape))

    def feed(self, builder: "FeatureIndexBuilder", images: Sequence[np.ndarray], prompts: Sequence[str],
             seeds: Optional[Sequence[int]] = None) -> list[int]:
        """Add the generation's finished images (uint8, sample order) to ``builder``; returns their image ids."""
        if not len(images) == len(prompts) == self.n_samples:
            raise InputError(f"the probe saw {self.n_samples} samples but got {len(images)} images and "
                             f"{len(prompts)} prompts; pass one image and prompt per sample")
        missing = [s for s in range(self.n_samples) if s not in self.chosen]
        if missing:
            raise ScheduleError(f"no call of the site reached progress >= {self.at} for image {missing[0]} of this "
                                f"generation; lower `at` or sample with more steps")
        ids = []
        for s in range(self.n_samples):
            codes, grid, ctx = self.chosen[s]
            ids.append(builder.add(images[s], prompts[s], codes, grid, progress=ctx.progress, sigma=ctx.sigma,
                                   calls=self.tallies[s] if self.profile else None,
                                   seed=None if seeds is None else int(seeds[s])))
        return ids


# ----------------------------------------------------------------------------- the builder


@dataclass
class _Kept:
    """An image held because it is in some top list, with the entries of exactly those features."""

    prompt: str
    seed: Optional[int]
    grid: Optional[tuple[int, int]]
    n_tokens: int
    token: Tensor
    latent: Tensor
    value: Tensor


class FeatureIndexBuilder:
    """Streams images into an index folder; checkpoints, resumes after a kill, and writes the index at the end.

    ``identity``: the dictionary's (:meth:`DictionaryIdentity.of`); ``source``: JSON-able settings of what feeds
    the images (prompts digest, seeds, model, ...), compared on resume like ``top_m``. A folder that holds a build
    of this dictionary with these settings is resumed (``n_images`` are done: feed the rest, in the same order); a
    complete one is reopened (``complete``); one of another dictionary or other settings is refused unless
    ``overwrite``. ``checkpoint_every``: images between checkpoints taken by :meth:`maybe_checkpoint`."""

    def __init__(self, folder: Union[str, os.PathLike], identity: DictionaryIdentity, *, top_m: int = 8,
                 source: Optional[Mapping[str, Any]] = None, checkpoint_every: int = 64, overwrite: bool = False):
        if identity.n_latents < 1 or top_m < 1:
            raise ConfigError(f"an index needs n_latents >= 1 and top_m >= 1, got {identity.n_latents} and {top_m}")
        if checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every={checkpoint_every}: checkpoint at least every image (>= 1)")
        self.folder, self.identity, self.top_m = Path(folder), identity, top_m
        self.checkpoint_every = checkpoint_every
        self.settings = _json_round_trip({
            "top_m": top_m, "thumb_max": THUMB_MAX, "vocab": VOCAB, "histogram_edges": HISTOGRAM_EDGES,
            "progress_bins": PROGRESS_BINS, "source": dict(source or {})})
        self.complete = False
        self._reset()
        self._open(overwrite)

    def _reset(self) -> None:
        n, m = self.identity.n_latents, self.top_m
        columns = len(GROUPS) * (PROGRESS_BINS + 1)
        self.n_images = self.n_tokens = 0
        self.fire_count = torch.zeros(n, dtype=torch.float64)
        self.activation_sum = torch.zeros(n, dtype=torch.float64)
        self.images_fired = torch.zeros(n, dtype=torch.int64)
        self.peak_sum = torch.zeros(n, dtype=torch.float64)
        # empty slots hold peak 0 and image -1, so any image on which a feature fires enters a list not yet full
        self.top_peak = torch.zeros(n, m)
        self.top_image = torch.full((n, m), -1, dtype=torch.int64)
        self.histogram = torch.zeros(n, HISTOGRAM_BINS, dtype=torch.int64)
        # profile column g * (PROGRESS_BINS + 1) + b: guidance group g, progress bin b (the last b: progress unknown)
        self.profile_fire = torch.zeros(columns, n, dtype=torch.int64)
        self.profile_sum = torch.zeros(columns, n, dtype=torch.float64)
        self.profile_tokens = torch.zeros(columns, dtype=torch.int64)
        self.sigma_sum = torch.zeros(PROGRESS_BINS + 1, dtype=torch.float64)
        self.sigma_calls = torch.zeros(PROGRESS_BINS + 1, dtype=torch.int64)
        self.word_images: dict[str, int] = {}
        self.word_peak_sum: dict[str, Tensor] = {}
        self._kept: dict[int, _Kept] = {}
        self._mask = torch.zeros(n, dtype=torch.bool)
        self._saved_at = 0

    @property
    def n_latents(self) -> int:
        return self.identity.n_latents

    @property
    def kept_images(self) -> int:
        """How many images are held now (those in some feature's top list)."""
        return len(self._kept)

    # --- opening, resuming, overwriting

    def _open(self, overwrite: bool) -> None:
        header_path = self.folder / "index.json"
        if self.folder.exists() and not self.folder.is_dir():
            raise InputError(f"{self.folder} is a file, not a folder for a feature index; pass a folder path")
        if header_path.is_file():
            if overwrite:
                self._clear()
            else:
                self._resume(_read_json(header_path, "the index header"))
                return
        elif self.folder.is_dir():
            if any(p.name not in (*OWN_NAMES, LABELS) for p in self.folder.iterdir()):
                raise InputError(f"{self.folder} is not empty and holds no feature index (index.json); pass a new or "
                                 f"empty folder")
            self._clear()
        self._write_header(complete=False, counts=None)

    def _resume(self, header: Any) -> None:
        where = self.folder / "index.json"
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise InputError(f"{where} is not a feature index header; pass a new folder, or overwrite it")
        if header.get("format_version") != FORMAT_VERSION:
            raise InputError(f"{where} has index format version {header.get('format_version')}, this version builds "
                             f"{FORMAT_VERSION}; pass a new folder, or overwrite it")
        built_from = _identity_in(header, where)
        if not built_from.same_dictionary(self.identity):
            raise DictionaryError(f"{self.folder} is an index of another dictionary ({built_from.file or 'unnamed'}, "
                                  f"{built_from.n_latents} latents); pass a new folder, or overwrite it")
        self.identity = built_from  # the index goes on describing the dictionary as it was first named
        if header.get("settings") != self.settings:
            changed = _changed_keys(header.get("settings"), self.settings)
            raise ConfigError(f"{self.folder} holds an index built with other settings ({', '.join(changed)}); pass a "
                              f"new folder, or overwrite it")
        if header.get("complete"):
            counts = header.get("counts")
            images = counts.get("images") if isinstance(counts, dict) else None
            if not isinstance(images, int):
                raise InputError(f"{where} is damaged (no image count); pass overwrite to build the index again")
            self.complete, self.n_images = True, images
            _remove_quietly(self.folder / STATE)
            return
        if (self.folder / STATE).is_file():
            self._load_state()
        self._drop_unkept_images()

    def _clear(self) -> None:
        """Remove what an earlier index left here (only this module's own names; labels.json is another's)."""
        for name in ("index.json", "summary.json", STATE):
            _remove_quietly(self.folder / name)
        for sub in ("features", "images"):
            folder = self.folder / sub
            if folder.is_dir():
                for path in folder.iterdir():
                    _remove_quietly(path)

    # --- adding images

    def add(self, image: np.ndarray, prompt: str, codes: SparseCodes, grid: Optional[tuple[int, int]], *,
            progress: Optional[float] = None, sigma: Optional[float] = None, cond: Optional[bool] = None,
            calls: Optional[Sequence[CallTally]] = None, seed: Optional[int] = None) -> int:
        """One generated (or real) image: ``image`` uint8 (H, W) or (H, W, 3); ``codes`` (T, k) of its site tokens
        at the chosen call (``progress``, ``sigma``, ``cond`` of that call), one row per token; ``grid`` (rows,
        cols) when the tokens are a row-major spatial grid, else None; ``calls``: tallies of every call of its
        sampling for the profiles (None: the chosen call alone feeds them); ``seed``: shown beside its top images.
        Returns the image's id (0, 1, 2, ...). A refused image leaves no trace."""
        if self.complete:
            raise InputError(f"{self.folder} is a complete index; build into a new folder, or overwrite it")
        pixels = _check_image(image)
        if not isinstance(prompt, str):
            raise InputError(f"an index image's prompt must be text, got {type(prompt).__name__}")
        if calls is not None and not all(isinstance(call, CallTally) for call in calls):
            raise InputError("calls must be CallTally records (made by sae_core.feature_index.tally)")
        seed = None if seed is None else int(seed)
        values, indices = _codes_cpu(codes)
        n_tokens = values.shape[0]
        grid = _check_grid(grid, n_tokens, values.shape)
        active = values > 0
        token, latent, value = active.nonzero()[:, 0], indices[active], values[active]
        tallies = [tally(codes, progress, sigma, cond)] if calls is None else list(calls)
        for ids in [latent] + [t.latent for t in tallies]:
            self._check_latents(ids)

        image_id = self.n_images
        self.n_images += 1
        self.n_tokens += n_tokens
        self.fire_count += torch.bincount(latent, minlength=self.n_latents)
        self.activation_sum.index_add_(0, latent, value.double())
        self._add_histogram(latent, value)
        for call in tallies:
            self._add_tally(call)
        peak = torch.zeros(self.n_latents).scatter_reduce_(0, latent, value, "amax")
        fired = peak.nonzero().squeeze(1)
        fired_peak = peak[fired]
        self.images_fired[fired] += 1
        self.peak_sum[fired] += fired_peak.double()
        self._add_words(prompt, fired, fired_peak)
        self._add_to_top_lists(image_id, pixels, prompt, seed, grid, n_tokens, token, latent, value, fired, fired_peak)
        return image_id

    def _check_latents(self, latent: Tensor) -> None:
        if latent.numel() and (int(latent.min()) < 0 or int(latent.max()) >= self.n_latents):
            bad = int(latent[(latent < 0) | (latent >= self.n_latents)][0])
            raise DictionaryError(f"latent index {bad} is out of range for an index of {self.n_latents} latents: "
                                  f"were these codes made by another dictionary?")

    def _add_histogram(self, latent: Tensor, value: Tensor) -> None:
        inner = torch.tensor(HISTOGRAM_EDGES[1:-1], dtype=torch.float32)
        bins = torch.bucketize(value, inner, right=True)
        self.histogram.view(-1).index_add_(0, latent * HISTOGRAM_BINS + bins, torch.ones_like(latent))

    def _add_tally(self, call: CallTally) -> None:
        column = _profile_column(call.progress, call.cond)
        self.profile_fire[column].index_add_(0, call.latent, call.fires.to(torch.int64))
        self.profile_sum[column].index_add_(0, call.latent, call.sums.to(torch.float64))
        self.profile_tokens[column] += call.tokens
        step = column % (PROGRESS_BINS + 1)
        if call.sigma is not None:
            self.sigma_sum[step] += call.sigma
            self.sigma_calls[step] += 1

    def _add_words(self, prompt: str, fired: Tensor, fired_peak: Tensor) -> None:
        for word in sorted(_words(prompt)):
            self.word_images[word] = self.word_images.get(word, 0) + 1
            sums = self.word_peak_sum.get(word)
            if sums is None and len(self.word_peak_sum) < VOCAB:
                sums = self.word_peak_sum[word] = torch.zeros(self.n_latents)
            if sums is not None:
                sums[fired] += fired_peak

    def _add_to_top_lists(self, image_id: int, pixels: np.ndarray, prompt: str, seed: Optional[int],
                          grid: Optional[tuple[int, int]], n_tokens: int, token: Tensor, latent: Tensor,
                          value: Tensor, fired: Tensor, fired_peak: Tensor) -> None:
        """A top list is a heap of top_m: the image replaces the list's weakest entry when it beats it."""
        low, slot = self.top_peak[fired].min(1)
        enters = fired_peak > low
        rows, slot = fired[enters], slot[enters]
        evicted = self.top_image[rows, slot]
        self.top_peak[rows, slot] = fired_peak[enters]
        self.top_image[rows, slot] = image_id
        self._forget(evicted, rows)
        if rows.numel():
            keep = self._member(latent, rows)
            self._kept[image_id] = _Kept(prompt, seed, grid, n_tokens, token[keep], latent[keep], value[keep])
            thumb = _thumbnail(pixels)
            atomic_write(self._thumbnail_path(image_id), lambda tmp: Image.fromarray(thumb).save(tmp, format="PNG"))

    def _forget(self, evicted: Tensor, rows: Tensor) -> None:
        """Drop the entries of features whose lists no longer hold an image, and images no list holds."""
        held = evicted >= 0
        evicted, rows = evicted[held], rows[held]
        order = evicted.argsort()
        ids, counts = torch.unique_consecutive(evicted[order], return_counts=True)
        for image_id, lost in zip(ids.tolist(), rows[order].split(counts.tolist())):
            kept = self._kept[image_id]
            stay = ~self._member(kept.latent, lost)
            if stay.any():
                kept.token, kept.latent, kept.value = kept.token[stay], kept.latent[stay], kept.value[stay]
            else:
                del self._kept[image_id]

    def _member(self, latent: Tensor, chosen: Tensor) -> Tensor:
        """``torch.isin(latent, chosen)`` through a latent-sized mask: linear, where isin sorts (10x slower here)."""
        self._mask[chosen] = True
        member = self._mask[latent]
        self._mask[chosen] = False
        return member

    def _thumbnail_path(self, image_id: int) -> Path:
        return self.folder / "images" / f"{image_id:06d}.png"

    # --- checkpoints

    def maybe_checkpoint(self) -> bool:
        """Checkpoint when ``checkpoint_every`` images came since the last one; call it between generations."""
        if self.n_images - self._saved_at < self.checkpoint_every:
            return False
        self.checkpoint()
        return True

    def checkpoint(self) -> None:
        """Save the whole state atomically (one file); a build killed later resumes from here."""
        tensors, meta = self._state()
        save_safetensors_atomic(self.folder / STATE, tensors, {"state": json.dumps(meta)})
        self._saved_at = self.n_images
        self._drop_unkept_images()

    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        kept = sorted(self._kept.items())
        sums = list(self.word_peak_sum.values())
        tensors = {
            "fire_count": self.fire_count, "activation_sum": self.activation_sum, "images_fired": self.images_fired,
            "peak_sum": self.peak_sum, "top_peak": self.top_peak, "top_image": self.top_image,
            "histogram": self.histogram, "profile_fire": self.profile_fire, "profile_sum": self.profile_sum,
            "profile_tokens": self.profile_tokens, "sigma_sum": self.sigma_sum, "sigma_calls": self.sigma_calls,
            "word_peak_sum": torch.stack(sums) if sums else torch.zeros(0, self.n_latents),
            "kept_token": torch.cat([k.token for _, k in kept]) if kept else torch.zeros(0, dtype=torch.int64),
            "kept_latent": torch.cat([k.latent for _, k in kept]) if kept else torch.zeros(0, dtype=torch.int64),
            "kept_value": torch.cat([k.value for _, k in kept]) if kept else torch.zeros(0),
        }
        meta = {
            "identity": self.identity.to_json(), "settings": self.settings, "n_images": self.n_images,
            "n_tokens": self.n_tokens, "word_images": list(self.word_images.items()),
            "summed_words": list(self.word_peak_sum),
            "kept": [[i, k.prompt, k.seed, k.grid, k.n_tokens, int(k.token.numel())] for i, k in kept],
        }
        return tensors, meta

    def _load_state(self) -> None:
        path = self.folder / STATE
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["state"])
            tensors = load_file(str(path))
            self._restore(tensors, meta)
        except (SafetensorError, OSError, KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
            raise InputError(f"{path} (the build's checkpoint) is damaged ({type(err).__name__}); pass overwrite to "
                             f"start the index again") from err

    def _restore(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        if meta["settings"] != self.settings or meta["identity"] != self.identity.to_json():
            raise ValueError("the checkpoint belongs to another build")
        for name in ("fire_count", "activation_sum", "images_fired", "peak_sum", "top_peak", "top_image", "histogram",
                     "profile_fire", "profile_sum", "profile_tokens", "sigma_sum", "sigma_calls"):
            current = getattr(self, name)
            loaded = tensors[name]
            if loaded.shape != current.shape or loaded.dtype != current.dtype:
                raise ValueError(f"{name} has shape {tuple(loaded.shape)}")
            setattr(self, name, loaded.clone())
        self.n_images, self.n_tokens = int(meta["n_images"]), int(meta["n_tokens"])
        self.word_images = {str(w): int(c) for w, c in meta["word_images"]}
        sums = tensors["word_peak_sum"]
        self.word_peak_sum = {str(w): sums[i].clone() for i, w in enumerate(meta["summed_words"])}
        counts = [int(entry[5]) for entry in meta["kept"]]
        parts = [tensors[name].split(counts) for name in ("kept_token", "kept_latent", "kept_value")]
        self._kept = {}
        for (image_id, prompt, seed, grid, n_tokens, _), token, latent, value in zip(meta["kept"], *parts):
            self._kept[int(image_id)] = _Kept(str(prompt), seed, None if grid is None else (int(grid[0]), int(grid[1])),
                                              int(n_tokens), token.clone(), latent.clone(), value.clone())
        self._saved_at = self.n_images

    def _drop_unkept_images(self) -> None:
        """Delete the image files no list holds (safe once the checkpoint that dropped them is on disk), and
        those a build killed after the last checkpoint left."""
        folder = self.folder / "images"
        if not folder.is_dir():
            return
        for path in folder.iterdir():
            if not path.stem.isdigit() or int(path.stem) not in self._kept:
                _remove_quietly(path)

    # --- writing the index

    def finish(self) -> "FeatureIndex":
        """Write pages, summary, image entries and the complete header; drop the checkpoint. Returns the reader."""
        if self.complete:
            return open_index(self.folder)
        if self.n_images == 0:
            raise InputError(f"no image was added to the index in {self.folder}; feed at least one image")
        records = self._records()
        for start in range(0, self.n_latents, PAGE_SIZE):
            page = {"first": start, "features": records[start:start + PAGE_SIZE]}
            _write_json(self.folder / "features" / f"{start:05d}.json", page)
        _write_json(self.folder / "summary.json", _summary(records))
        for image_id, kept in self._kept.items():
            order = kept.latent.argsort(stable=True)
            save_safetensors_atomic(self.folder / "images" / f"{image_id:06d}.safetensors",
                                    {"token": kept.token[order].int(), "latent": kept.latent[order].int(),
                                     "value": kept.value[order].float()},
                                    {"image": json.dumps({"grid": kept.grid, "n_tokens": kept.n_tokens})})
        self._drop_unkept_images()
        live = int((self.images_fired > 0).sum())
        self._write_header(complete=True, counts={"images": self.n_images, "tokens": self.n_tokens,
                                                  "live": live, "dead": self.n_latents - live})
        self.complete = True
        _remove_quietly(self.folder / STATE)
        return open_index(self.folder)

    def _write_header(self, complete: bool, counts: Optional[dict[str, int]]) -> None:
        header = {"format": FORMAT, "format_version": FORMAT_VERSION, "complete": complete,
                  "dictionary": self.identity.to_json(), "settings": self.settings, "page_size": PAGE_SIZE}
        if counts is not None:
            header["counts"] = counts
            header["profile"] = self._profile_header()
        _write_json(self.folder / "index.json", header)

    def _profile_header(self) -> dict[str, Any]:
        tokens = self.profile_tokens.view(len(GROUPS), PROGRESS_BINS + 1)
        sigma = (self.sigma_sum / self.sigma_calls.clamp_min(1)).tolist()
        return {"edges": [b / PROGRESS_BINS for b in range(PROGRESS_BINS + 1)],
                "tokens": tokens[:, :PROGRESS_BINS].sum(0).tolist(),
                "sigma_mean": [_round(s) if n else None for s, n in zip(sigma, self.sigma_calls.tolist())][:-1],
                "unknown_progress_tokens": int(tokens[:, PROGRESS_BINS].sum()),
                "guidance_tokens": dict(zip(GROUPS, tokens.sum(1).tolist()))}

    def _records(self) -> list[dict[str, Any]]:
        """Every feature's record (see the module docstring). Features silent in every call share one record shape
        full of zeros; the others are computed on that subset only, so a large, mostly silent dictionary is cheap."""
        seen = ((self.images_fired > 0) | (self.profile_fire.sum(0) > 0)).nonzero().squeeze(1)
        frequency = (self.fire_count[seen] / max(self.n_tokens, 1)).tolist()
        mean = (self.activation_sum[seen] / self.fire_count[seen].clamp_min(1)).tolist()
        images, histogram = self.images_fired[seen].tolist(), self.histogram[seen].tolist()
        top_image, top_peak = self.top_image[seen].tolist(), self.top_peak[seen].tolist()
        steps, guidance = self._profiles(seen)
        silent = _silent_record()
        records = [{**silent, "id": f} for f in range(self.n_latents)]
        for j, (f, words) in enumerate(zip(seen.tolist(), self._word_scores(seen))):
            records[f] = {
                "id": f, "frequency": _round(frequency[j]), "images": images[j],
                "image_frequency": _round(images[j] / self.n_images), "mean": _round(mean[j]),
                "max": _round(max(top_peak[j])), "score": _round(words[0][1]) if words else 0.0,
                "words": [[w, _round(v)] for w, v in words],
                "histogram": histogram[j],
                "timesteps": {"rate": _rounded(steps[0][j]), "mean": _rounded(steps[1][j])},
                "guidance": {"rate": _rounded(guidance[0][j]), "mean": _rounded(guidance[1][j])},
                "top": [{"image": i, "peak": _round(p), "prompt": self._kept[i].prompt, "seed": self._kept[i].seed}
                        for i, p in _strongest_first(top_image[j], top_peak[j])],
            }
        return records

    def _profiles(self, features: Tensor) -> tuple[tuple[list, list], tuple[list, list]]:
        """(rate, mean) of ``features`` per progress bin and per guidance group, each a per-feature list of lists."""
        fire = self.profile_fire[:, features].view(len(GROUPS), PROGRESS_BINS + 1, -1).double()
        total = self.profile_sum[:, features].view(len(GROUPS), PROGRESS_BINS + 1, -1)
        tokens = self.profile_tokens.view(len(GROUPS), PROGRESS_BINS + 1).double()

        def rate_and_mean(f: Tensor, s: Tensor, t: Tensor) -> tuple[list, list]:
            return (f / t.clamp_min(1)[:, None]).T.tolist(), (s / f.clamp_min(1)).T.tolist()

        steps = rate_and_mean(fire[:, :PROGRESS_BINS].sum(0), total[:, :PROGRESS_BINS].sum(0),
                              tokens[:, :PROGRESS_BINS].sum(0))
        guidance = rate_and_mean(fire.sum(1), total.sum(1), tokens.sum(1))
        return steps, guidance

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


def _check_grid(grid: Optional[Sequence[int]], n_tokens: int, shape: torch.Size) -> Optional[tuple[int, int]]:
    if grid is None:
        return None
    grid = (int(grid[0]), int(grid[1]))
    if grid[0] * grid[1] != n_tokens:
        raise InputError(f"grid {grid} has {grid[0] * grid[1]} cells but the codes have {n_tokens} tokens (values "
                         f"{tuple(shape)}); pass grid=None for tokens that are not a spatial grid")
    return grid


def _strongest_first(images: list[int], peaks: list[float]) -> list[tuple[int, float]]:
    """(image id, peak) of a feature's top list, strongest first, earlier image first on ties."""
    return sorted(((i, p) for i, p in zip(images, peaks) if i >= 0), key=lambda ip: (-ip[1], ip[0]))


def _profile_column(progress: Optional[float], cond: Optional[bool]) -> int:
    group = 1 if cond is False else 0
    if progress is None or not math.isfinite(progress):
        step = PROGRESS_BINS
    else:
        step = min(max(int(progress * PROGRESS_BINS), 0), PROGRESS_BINS - 1)
    return group * (PROGRESS_BINS + 1) + step


def _silent_record() -> dict[str, Any]:
    """The record of a feature that never fired (its lists are shared between such records: never mutate them)."""
    zeros = [0.0] * PROGRESS_BINS
    return {"id": -1, "frequency": 0.0, "images": 0, "image_frequency": 0.0, "mean": 0.0, "max": 0.0, "score": 0.0,
            "words": [], "histogram": [0] * HISTOGRAM_BINS, "timesteps": {"rate": zeros, "mean": zeros},
            "guidance": {"rate": [0.0, 0.0], "mean": [0.0, 0.0]}, "top": []}


def _summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Columns over all features, in id order: what sorting and searching need without the pages."""
    return {"frequency": [r["frequency"] for r in records], "images": [r["images"] for r in records],
            "mean": [r["mean"] for r in records], "score": [r["score"] for r in records],
            "words": [" ".join(w for w, _ in r["words"]) for r in records],
            "thumbnail": [r["top"][0]["image"] if r["top"] else -1 for r in records]}


def _thumbnail(pixels: np.ndarray) -> np.ndarray:
    """RGB copy whose longest side is at most THUMB_MAX."""
    image = Image.fromarray(pixels).convert("RGB")
    if max(image.size) > THUMB_MAX:
        image.thumbnail((THUMB_MAX, THUMB_MAX), Image.BILINEAR)
    return np.asarray(image).copy()


def _round(v: float) -> float:
    return float(f"{v:.6g}")


def _rounded(values: Sequence[float]) -> list[float]:
    return [float(f"{v:.6g}") for v in values]


# ----------------------------------------------------------------------------- the reader


class FeatureIndex:
    """A complete index, read lazily: the header at once, summary and pages when asked (see :func:`open_index`)."""

    def __init__(self, folder: Path, header: dict[str, Any],
                 labels: Optional[Callable[[int], Optional[str]]] = None):
        self.folder, self.header = folder, header
        self._labels = labels
        self._summary: Optional[dict[str, Any]] = None
        self._pages: OrderedDict[int, list[dict[str, Any]]] = OrderedDict()
        self._images: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self._label_file: tuple[Optional[tuple[int, int]], dict[int, str]] = (None, {})

    @property
    def n_latents(self) -> int:
        return int(self.header["dictionary"]["n_latents"])

    @property
    def top_m(self) -> int:
        return int(self.header["settings"]["top_m"])

    def page(self, offset: int = 0, limit: int = PAGE_SIZE, sort: str = "frequency",
             query: Optional[str] = None) -> dict[str, Any]:
        """A page of feature rows (id, frequency, images, mean, score, words, thumbnail, label).

        ``sort``: "id" ascending, or "frequency" / "images" / "mean" / "score" descending (then id). ``query``:
        features whose words or label contain it (case-insensitive). Sorted by id without a query, the rows come
        from the one or two page files holding them; otherwise from ``summary.json`` (read once)."""
        offset, limit = _page_bounds(offset, limit)
        if sort not in SORTS:
            raise InputError(f"sort={sort!r}: use one of {', '.join(SORTS)}")
        if query is not None and not isinstance(query, str):
            raise InputError(f"query must be text, got {type(query).__name__}")
        query = (query or "").strip().lower() or None
        if sort == "id" and query is None:
            ids = list(range(offset, min(offset + limit, self.n_latents)))
            rows = [self._row_from_record(self.feature(i)) for i in ids]
            total = self.n_latents
        else:
            ids, total = self._selected(offset, limit, sort, query)
            rows = [self._row_from_summary(i) for i in ids]
        label_of = self._label_of()
        for row in rows:
            text = label_of(row["id"])
            row["label"] = None if text is None else str(text)
        return {"total": total, "offset": offset, "limit": limit, "sort": sort, "query": query, "features": rows}

    def feature(self, i: int) -> dict[str, Any]:
        """The full record of feature ``i`` (see the module docstring); one page file read, cached."""
        i = self._check_feature(i)
        first = i - i % PAGE_SIZE
        return self._page_records(first)[i - first]

    def label(self, i: int) -> Optional[str]:
        """Feature ``i``'s label text (the ``labels`` callable, else ``labels.json``); None when it has none."""
        text = self._label_of()(self._check_feature(i))
        return None if text is None else str(text)

    def image_path(self, i: int, rank: int) -> Path:
        """The thumbnail of feature ``i``'s ``rank``-th top image (0 = strongest)."""
        return self._image_file(self._top_entry(i, rank)["image"], ".png")

    def heatmap(self, i: int, rank: int) -> Optional[np.ndarray]:
        """Feature ``i``'s activation per token of its ``rank``-th top image, (rows, cols) float32 in activation
        units; None when the image's tokens are not a spatial grid."""
        entries = self._entries(self._top_entry(i, rank)["image"])
        if entries.grid is None:
            return None
        mine = entries.latent == i
        act = torch.zeros(entries.n_tokens).index_put_((entries.token[mine],), entries.value[mine], accumulate=True)
        return act.reshape(entries.grid).numpy()

    def tile(self, i: int, rank: int, scale_max: Optional[float] = None) -> Image.Image:
        """Feature ``i``'s ``rank``-th top image, enlarged when small, with its activation overlaid (black -> red
        -> yellow up to ``scale_max``, by default the feature's strongest peak); a plain frame without a grid."""
        pixels = self._pixels(self._top_entry(i, rank)["image"])
        h, w = pixels.shape[:2]
        scale = max(1, -(-MIN_TILE // max(h, w)))
        base = pixels.repeat(scale, 0).repeat(scale, 1)
        heat = self.heatmap(i, rank)
        if heat is None:
            return Image.fromarray(base)
        top = scale_max if scale_max is not None else self.feature(i)["max"]
        cells = np.clip(heat / max(float(top), 1e-12), 0.0, 1.0).astype(np.float32)
        smooth = Image.fromarray(cells).resize((w * scale, h * scale), Image.BILINEAR)
        return Image.fromarray(overlay(base, np.clip(np.asarray(smooth), 0.0, 1.0)))

    def summary(self) -> dict[str, Any]:
        """The columns of ``summary.json`` (read once)."""
        if self._summary is None:
            data = _read_json(self.folder / "summary.json", "the index summary")
            if not isinstance(data, dict) or any(len(data.get(k) or ()) != self.n_latents for k in _SUMMARY_KEYS):
                raise InputError(f"{self.folder / 'summary.json'} is damaged; rebuild the index (overwrite)")
            self._summary = data
        return self._summary

    # --- helpers

    def _selected(self, offset: int, limit: int, sort: str, query: Optional[str]) -> tuple[list[int], int]:
        summary = self.summary()
        ids = np.arange(self.n_latents)
        if query is not None:
            label_of, words = self._label_of(), summary["words"]
            ids = np.array([i for i in range(self.n_latents)
                            if query in words[i].lower() or query in str(label_of(i) or "").lower()], dtype=np.int64)
        if sort != "id" and ids.size:
            key = np.asarray(summary[sort], dtype=np.float64)[ids]
            ids = ids[np.lexsort((ids, -key))]
        return ids[offset:offset + limit].tolist(), int(ids.size)

    def _row_from_summary(self, i: int) -> dict[str, Any]:
        s = self.summary()
        return {"id": i, "frequency": s["frequency"][i], "images": s["images"][i], "mean": s["mean"][i],
                "score": s["score"][i], "words": s["words"][i].split(), "thumbnail": self._thumb(s["thumbnail"][i])}

    def _row_from_record(self, record: dict[str, Any]) -> dict[str, Any]:
        return {"id": record["id"], "frequency": record["frequency"], "images": record["images"],
                "mean": record["mean"], "score": record["score"], "words": [w for w, _ in record["words"]],
                "thumbnail": self._thumb(record["top"][0]["image"] if record["top"] else -1)}

    @staticmethod
    def _thumb(image_id: int) -> Optional[str]:
        return f"images/{int(image_id):06d}.png" if image_id >= 0 else None

    def _check_feature(self, i: Any) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= int(i) < self.n_latents:
            raise DictionaryError(f"feature {i!r} is out of range: this index has features 0..{self.n_latents - 1}")
        return int(i)

    def _top_entry(self, i: int, rank: int) -> dict[str, Any]:
        top = self.feature(i)["top"]
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < len(top):
            raise InputError(f"feature {i} has {len(top)} top image(s); rank {rank!r} is out of range")
        return top[int(rank)]

    def _image_file(self, image_id: int, suffix: str) -> Path:
        return self.folder / "images" / f"{int(image_id):06d}{suffix}"

    def _pixels(self, image_id: int) -> np.ndarray:
        """A kept image's thumbnail, (h, w, 3) uint8; the last few are cached (an image sits in many lists)."""
        return _cached(self._images, ("pixels", image_id), lambda: self._read_pixels(image_id))

    def _read_pixels(self, image_id: int) -> np.ndarray:
        path = self._image_file(image_id, ".png")
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"))
        except OSError as err:
            raise InputError(f"{path} is missing or damaged ({err}); rebuild the index") from err

    def _entries(self, image_id: int) -> "_Entries":
        """A kept image's (token, latent, value) entries; the last few are cached."""
        return _cached(self._images, ("entries", image_id), lambda: self._read_entries(image_id))

    def _read_entries(self, image_id: int) -> "_Entries":
        path = self._image_file(image_id, ".safetensors")
        try:
            with safe_open(str(path), framework="pt") as f:
                about = json.loads((f.metadata() or {})["image"])
                token, latent, value = f.get_tensor("token").long(), f.get_tensor("latent"), f.get_tensor("value")
            grid = None if about["grid"] is None else (int(about["grid"][0]), int(about["grid"][1]))
            n_tokens = int(about["n_tokens"])
            if (grid is not None and grid[0] * grid[1] != n_tokens) or bool(((token < 0) | (token >= n_tokens)).any()):
                raise ValueError("tokens outside the image")
        except (SafetensorError, OSError, KeyError, TypeError, ValueError, IndexError) as err:
            raise InputError(f"{path} is damaged ({type(err).__name__}); rebuild the index") from err
        return _Entries(grid, n_tokens, token, latent, value)

    def _page_records(self, first: int) -> list[dict[str, Any]]:
        return _cached(self._pages, first, lambda: self._read_page(first), size=8)

    def _read_page(self, first: int) -> list[dict[str, Any]]:
        path = self.folder / "features" / f"{first:05d}.json"
        data = _read_json(path, "an index page")
        expected = min(PAGE_SIZE, self.n_latents - first)
        records = data.get("features") if isinstance(data, dict) else None
        if (not isinstance(records, list) or len(records) != expected
                or any(not isinstance(r, dict) or r.get("id") != first + j for j, r in enumerate(records))):
            raise InputError(f"{path} is damaged (not the records of features {first}..{first + expected - 1}); "
                             f"rebuild the index (overwrite)")
        return records

    def _label_of(self) -> Callable[[int], Optional[str]]:
        """Labels by feature: the callable given to :func:`open_index`, else ``labels.json`` (reread when it
        changes, since labelling may run while the index is browsed)."""
        if self._labels is not None:
            return self._labels
        path = self.folder / LABELS
        try:
            stat = path.stat()
        except OSError:
            return lambda i: None
        stamp = (stat.st_mtime_ns, stat.st_size)
        if self._label_file[0] != stamp:
            try:
                data = json.loads(path.read_bytes())
            except (OSError, ValueError):
                data = None
            self._label_file = (stamp, label_texts(data))
        return self._label_file[1].get


_SUMMARY_KEYS = ("frequency", "images", "mean", "score", "words", "thumbnail")
CACHED_IMAGES = 128
"""Thumbnails and entries kept in memory by a reader (an image sits in many top lists; 256 px thumbnails are 196 kB)."""


@dataclass(frozen=True)
class _Entries:
    grid: Optional[tuple[int, int]]
    n_tokens: int
    token: Tensor
    latent: Tensor
    value: Tensor


def _cached(cache: OrderedDict, key: Any, read: Callable[[], Any], size: int = CACHED_IMAGES) -> Any:
    """``cache[key]``, read on a miss; the least recently used entry goes beyond ``size``."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = cache[key] = read()
    if len(cache) > size:
        cache.popitem(last=False)
    return value


def label_texts(data: Any) -> dict[int, str]:
    """Feature id -> label text from a parsed ``labels.json``, whatever its nesting: records with ``feature`` and
    ``text`` keys (a ``status`` other than "ok" is skipped), or mappings keyed by feature id whose values are text,
    lists of text or such records. Several labels of a feature (several sources) are joined with " / "."""
    found: dict[int, list[str]] = {}

    def add(feature: Optional[int], text: Any) -> None:
        if feature is not None and isinstance(text, str) and text.strip():
            found.setdefault(feature, []).append(text.strip())

    def visit(node: Any, feature: Optional[int], keyed: bool) -> None:
        if isinstance(node, dict):
            own = _feature_id(node.get("feature"), feature)
            if "text" in node and node.get("status", "ok") == "ok":
                add(own, node["text"])
            for key, value in node.items():
                if key not in ("text", "feature"):
                    child = _feature_id(key, None)
                    visit(value, own if child is None else child, child is not None)
        elif isinstance(node, list):
            for item in node:
                visit(item, feature, keyed)
        elif keyed:
            add(feature, node)

    visit(data, None, False)
    return {f: " / ".join(dict.fromkeys(texts)) for f, texts in found.items()}


def _feature_id(value: Any, default: Optional[int]) -> Optional[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return int(value) if isinstance(value, str) and value.isdigit() else default


def open_index(folder: Union[str, os.PathLike], dictionary: Any = None,
               labels: Optional[Callable[[int], Optional[str]]] = None) -> FeatureIndex:
    """Open a complete index for reading. ``dictionary`` (a loaded one or its file path), when given, must be the
    one the index was built from; ``labels``: feature -> label text for rows and queries (default: ``labels.json``
    in the folder when present). Refuses a folder that is not an index, an unfinished build, another format
    version, or another dictionary."""
    folder = Path(folder)
    header_path = folder / "index.json"
    if not header_path.is_file():
        raise InputError(f"{folder} is not a feature index (no index.json); build one first, or pick the "
                         f"<dictionary>.features folder")
    header = _read_json(header_path, "the index header")
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise InputError(f"{header_path} is not a feature index header (format {FORMAT!r} expected); rebuild the "
                         f"index")
    if header.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{header_path} has index format version {header.get('format_version')!r}; this version reads "
                         f"{FORMAT_VERSION}: rebuild the index")
    identity = _identity_in(header, header_path)
    if not header.get("complete"):
        raise InputError(f"{folder} holds an unfinished index build; run the build again with the same settings to "
                         f"resume it")
    if not isinstance(header.get("settings"), dict) or not isinstance(header["settings"].get("top_m"), int):
        raise InputError(f"{header_path} is damaged (no build settings); rebuild the index (overwrite)")
    if dictionary is not None:
        _check_dictionary(identity, dictionary, folder)
    return FeatureIndex(folder, header, labels)


def _check_dictionary(identity: DictionaryIdentity, dictionary: Any, folder: Path) -> None:
    if isinstance(dictionary, (str, os.PathLike)):
        content = header_content_hash(dictionary)
        if content and identity.content_hash:
            if content != identity.content_hash:
                raise DictionaryError(f"{folder} is the index of another dictionary ({identity.file or 'unnamed'}), "
                                      f"not {Path(dictionary).name}; rebuild it for this dictionary")
            return
        from .loading import load_dictionary

        given = DictionaryIdentity.of(load_dictionary(dictionary), dictionary)
    else:
        given = DictionaryIdentity.of(dictionary)
    if not given.same_dictionary(identity):
        raise DictionaryError(f"{folder} is the index of another dictionary ({identity.file or 'unnamed'}, "
                              f"{identity.n_latents} latents, d_in {identity.d_in}), not this one ({given.n_latents} "
                              f"latents, d_in {given.d_in}); rebuild it for this dictionary")


def _identity_in(header: dict[str, Any], where: Path) -> DictionaryIdentity:
    try:
        return DictionaryIdentity.from_json(header["dictionary"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise InputError(f"{where} is damaged (its dictionary identity is unreadable: {type(err).__name__}); rebuild "
                         f"the index (overwrite)") from err


def _page_bounds(offset: Any, limit: Any) -> tuple[int, int]:
    for name, value in (("offset", offset), ("limit", limit)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InputError(f"{name} must be a whole number, got {value!r}")
    if offset < 0 or not 1 <= limit <= MAX_PAGE:
        raise InputError(f"offset {offset} and limit {limit}: use offset >= 0 and 1 <= limit <= {MAX_PAGE}")
    return int(offset), int(limit)


# ----------------------------------------------------------------------------- files and pictures


def overlay(base: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """``heat`` in [0, 1] as a black -> red -> yellow ramp blended over ``base`` (h, w, 3) uint8, more opaque
    where hotter so that the image stays readable where the feature is silent."""
    colour = np.stack([np.clip(2 * heat, 0, 1), np.clip(2 * heat - 1, 0, 1), np.zeros_like(heat)], -1) * 255
    alpha = (ALPHA_COLD + (ALPHA_HOT - ALPHA_COLD) * heat)[..., None]
    return (base * (1 - alpha) + colour * alpha).round().astype(np.uint8)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError as err:
        raise InputError(f"{path} ({what}) is missing; rebuild the index (overwrite)") from err
    except (OSError, ValueError) as err:
        raise InputError(f"{path} ({what}) is damaged ({type(err).__name__}); rebuild the index (overwrite)") from err


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _json_round_trip(data: Any) -> Any:
    """``data`` as it reads back from JSON (tuples become lists), so settings compare equal after a restart."""
    return json.loads(json.dumps(data))


def _changed_keys(old: Any, new: dict[str, Any]) -> list[str]:
    if not isinstance(old, dict):
        return ["all"]
    flat_old, flat_new = _flatten(old), _flatten(new)
    return sorted(k for k in flat_old.keys() | flat_new.keys() if flat_old.get(k) != flat_new.get(k))


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def texts_digest(texts: Iterable[str]) -> str:
    """sha256 over a sequence of texts (e.g. the prompts of a build), for comparing settings on resume."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()
