"""Concepts made of dictionary features: find them from examples, add them, swap one for another.

A *concept* is a weighted set of dictionary features ``{(f, w_f)}``. Its model-space direction is
``u = sum_f w_f v_f``, where ``v_f`` is the change one unit of feature ``f`` makes
(:meth:`~sae_core.dictionary.Dictionary.direction`).

**From examples.** Given activations of positive examples (prompts showing the concept) and of negative
ones (prompts without it), let ``c+`` and ``c-`` be the mean sparse codes of their tokens
(:func:`mean_codes`). The concept is the SAE projection of the difference of means: ``d = c+ - c-``,
kept to its ``top_n`` features by ``|d_f|`` (:func:`concept_from_codes`), with weights ``w_f = d_f``.

Why that is the right direction: decoding is affine in the codes, ``decode(c) = sum_f c_f v_f + b`` (``b``
the decoder bias, mapped to model space), so the mean of the reconstructions is the reconstruction of the
mean codes, and

    decode(c+) - decode(c-) = sum_f d_f v_f

with the bias cancelled. Over every feature this is the difference of the mean *reconstructions* of the
two sets: the supervised difference of means of the activations, less the difference of their mean
reconstruction errors (what the dictionary does not explain). Restricted to the kept features it is the
part of that difference those features explain. Adding the concept at strength 1 in raw units
(:meth:`Concept.steer`) therefore adds exactly that part of the mean difference.
:attr:`Concept.coverage` says how much of the full reconstruction difference survived the cut to ``top_n``.

**From words.** A feature index (:mod:`sae_core.feature_index`) already lists, per feature, the prompt
words whose images it fires on more than on the rest; :func:`concept_from_words` builds a concept from
them without generating anything.

**Per position.** Where a concept is drawn (a digit's strokes on an image stream, a class word's place in a
prompt) its mean difference differs from token to token. :func:`spatial_concept_from_codes` keeps the top-n
features of the difference at *each* token position (from mean codes per position, ``(tokens, n_latents)``), and
:func:`spatial_steer_function` adds each position's own ``sum_f w[p, f] v_f`` there. In the steering lab this
was the SAE method that flipped most classes on both model organisms (BENCHMARKS.md); it needs the token layout
it was measured on (the same resolution).

**Per step and position, clamped.** The mean codes change along sampling as much as across the picture, and
a sample's own activation already holds some of each feature. :func:`scheduled_concept_from_codes` keeps the
top-n features of the difference at each *step* and position, with the positive side's mean code there as a
target, and :func:`clamp_steer_function` moves the sample's activation of each of them to that target (adding
``strength * (target - current)`` of the feature's direction; the rest of the activation is kept). In the
steering lab this flipped more classes cleanly than adding a per-position concept (BENCHMARKS.md).
:class:`StepCodeMeter` measures the mean codes per step without a dense ``(steps, tokens, n_latents)`` array.

**Replacing.** :func:`replace_steers` gives the detect-then-replace edit: on the tokens where the source
concept's features fire, remove them and add the target concept; every other token is left bit-identical
(see :class:`~sae_core.steering.Steer`'s ``detect``).
"""
from __future__ import annotations

import difflib
import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from .dictionary import Dictionary
from .errors import DictionaryError, ScheduleError, SteerError
from .sites.context import SiteContext, SiteFunction, prompt_rows
from .steering import Steer, checked_mask, feature_activations, feature_directions, mask_per_token, require_grid
from .timesteps import Window, in_window, validate_window

SIGNS = ("both", "positive")
ENCODE_ELEMENTS = 1 << 24
"""Rows are encoded in chunks of about this many (rows x latents) pre-activations, bounding memory."""
SUGGESTED_WORDS = 8
FIXED_OPTIONS = ("mode", "units", "features", "strengths")


@dataclass(frozen=True)
class Concept:
    """A weighted set of dictionary features.

    ``features``: feature ids, strongest first. ``weights``: one per feature, in activation units (for a
    concept from examples, the mean code difference positive minus negative). ``coverage``:
    ``||sum_kept w_f v_f|| / ||sum_all d_f v_f||``, the norm of the concept's direction over the norm of the
    direction of the full code difference ``d`` (every feature, before the cut to ``top_n``): 1 when nothing
    was cut, below 1 by the share the dropped features carried; it can exceed 1 when dropped features
    partly cancelled kept ones. NaN when unknown (no dictionary given, a concept from words, or a zero full
    difference)."""

    features: tuple[int, ...]
    weights: tuple[float, ...]
    coverage: float = math.nan

    def __post_init__(self) -> None:
        features = tuple(_feature_id(f) for f in self.features)
        weights = tuple(float(w) for w in self.weights)
        if not features:
            raise SteerError("a concept needs at least one feature: pick feature ids (and one weight each)")
        if len(weights) != len(features):
            raise SteerError(f"a concept has {len(features)} feature(s) but {len(weights)} weight(s): give one each")
        if len(set(features)) != len(features):
            raise SteerError(f"a concept lists feature(s) twice ({list(features)}): list each once")
        if not all(math.isfinite(w) for w in weights):
            raise SteerError(f"concept weights must be finite numbers, got {list(weights)}")
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "coverage", float(self.coverage))

    def direction(self, dictionary: Dictionary) -> Tensor:
        """``sum_f w_f * dictionary.direction(f)``: ``(d_in,)`` float32, summed in float64."""
        _check_ids(dictionary, self.features)
        directions = feature_directions(dictionary, self.features).double()
        return (torch.tensor(self.weights, dtype=torch.float64) @ directions).float()

    def steer(self, strength: float = 1.0, **steer_options: Any) -> Steer:
        """A :class:`Steer` adding ``strength`` x the concept in raw units: at strength 1 every edited token moves
        by exactly :meth:`direction`. ``steer_options``: any other Steer field (window, sigma_range, cond_only,
        subtract_uncond, mask, where, detect, detect_threshold)."""
        fixed = sorted(set(steer_options) & set(FIXED_OPTIONS))
        if fixed:
            raise SteerError(f"a concept is added in raw units with its own features and weights; drop "
                             f"{', '.join(fixed)} (scale it with strength)")
        s = _finite(strength, "strength")
        return Steer(self.features, tuple(s * w for w in self.weights), mode="add", units="raw", **steer_options)


def mean_codes(dictionary: Dictionary, activations: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """Mean sparse code of the rows of ``activations`` ``(N, d)`` or ``(B, T, d)``: dense ``(n_latents,)``
    float64 on the CPU (a latent not selected on a row counts 0 there).

    ``weights``: optional per-row weights, ``(N,)`` or ``activations.shape[:-1]``, >= 0, for a weighted mean.
    Rows are encoded in chunks and their codes scatter-added, so no ``(N, n_latents)`` matrix is built."""
    x = torch.as_tensor(activations)
    if x.ndim not in (2, 3):
        raise SteerError(f"mean codes take activations shaped (N, d) or (batch, tokens, d), got {tuple(x.shape)}")
    if x.shape[-1] != dictionary.d_in:
        raise DictionaryError(f"activations have width {x.shape[-1]} but the dictionary expects d_in="
                              f"{dictionary.d_in}; use a dictionary trained on this site")
    rows = x.detach().reshape(-1, x.shape[-1])
    if rows.shape[0] == 0:
        raise SteerError("mean codes need at least one activation row: the set is empty")
    if not bool(torch.isfinite(rows).all()):
        bad = int((~torch.isfinite(rows).all(-1)).sum())
        raise SteerError(f"{bad} activation row(s) hold NaN or inf: the model produced non-finite activations; "
                         "drop those samples")
    row_weights = _row_weights(weights, x.shape[:-1], rows.device)
    n = dictionary.n_latents
    total = torch.zeros(n, dtype=torch.float64)
    chunk = max(1, ENCODE_ELEMENTS // max(n, 1))
    dtype = torch.promote_types(rows.dtype, torch.float32)
    with torch.no_grad():
        for start in range(0, rows.shape[0], chunk):
            codes = dictionary.encode(rows[start:start + chunk].to(dtype))
            values = codes.values.float()
            if row_weights is not None:
                values = values * row_weights[start:start + chunk, None]
            part = torch.zeros(n, dtype=values.dtype, device=values.device)
            part.index_add_(0, codes.indices.reshape(-1), values.reshape(-1))
            total += part.cpu().double()
    count = float(rows.shape[0]) if row_weights is None else float(row_weights.double().sum())
    return total / count


def concept_from_codes(positive: Tensor, negative: Tensor, top_n: int, sign: str = "both", *,
                       dictionary: Optional[Dictionary] = None) -> Concept:
    """The concept of ``positive - negative`` mean codes (``(n_latents,)`` each, e.g. from :func:`mean_codes`).

    Keeps the ``top_n`` features with the largest ``|diff|`` (``sign="both"``) or the largest positive ``diff``
    (``sign="positive"``: only features the positives add), never an exact zero; weights are ``diff`` there,
    strongest first (lower id first on ties). ``dictionary``, when given, fills in :attr:`Concept.coverage`."""
    if sign not in SIGNS:
        raise SteerError(f"unknown concept sign {sign!r}: use 'both' (largest |difference|) or 'positive' "
                         "(only features the positives add)")
    top_n = _top_n(top_n)
    pos, neg = _code_vector(positive, "positive"), _code_vector(negative, "negative")
    if pos.shape != neg.shape:
        raise SteerError(f"positive and negative mean codes have {pos.numel()} and {neg.numel()} latents: compute "
                         "both with the same dictionary")
    diff = pos - neg
    key = diff.abs() if sign == "both" else diff
    candidates = (key > 0).nonzero().flatten()
    if candidates.numel() == 0:
        which = "no feature differs between them" if sign == "both" else "no feature is stronger on the positives"
        raise SteerError(f"the positive and negative codes give no concept: {which}; use other examples")
    order = torch.argsort(-key[candidates], stable=True)
    kept = candidates[order[:top_n]]
    coverage = math.nan if dictionary is None else _coverage(dictionary, diff, kept)
    return Concept(tuple(kept.tolist()), tuple(diff[kept].tolist()), coverage)


def concept_from_words(index: Any, word: str, top_n: int) -> Concept:
    """A concept from a feature index (:func:`sae_core.feature_index.open_index`), without generating.

    The features whose associated prompt words (the few best the index keeps per feature) include ``word``
    (case-insensitive), ranked by word score x mean activation and kept to ``top_n``. Each weight is in the units
    of :func:`concept_from_codes`, a mean code over tokens, so one strength means the same for both: the
    feature's mean code on the images it fires in (mean activation x token frequency / image frequency), times
    its word score relative to the best kept score."""
    top_n = _top_n(top_n)
    if not isinstance(word, str) or not re.fullmatch(r"[a-z]+", word.strip().lower()):
        raise SteerError(f"concept word {word!r}: give one word of letters (the index stores prompt words like "
                         "'seven' or 'giraffe')")
    word = word.strip().lower()
    listed = index.summary()["words"]
    matches = [i for i, words in enumerate(listed) if word in words.lower().split()]
    scored = []
    for i in matches:
        record = index.feature(i)
        score = next((float(s) for w, s in record["words"] if w.lower() == word), 0.0)
        if score > 0 and record["mean"] > 0 and record["image_frequency"] > 0:
            code = float(record["mean"]) * float(record["frequency"]) / float(record["image_frequency"])
            scored.append((score * float(record["mean"]), i, score, code))
    if not scored:
        raise SteerError(f"no feature of this index is associated with the word {word!r}; words it knows include "
                         f"{', '.join(_suggestions(listed, word))}")
    scored.sort(key=lambda item: (-item[0], item[1]))
    kept = scored[:top_n]
    best = max(score for _, _, score, _ in kept)
    return Concept(tuple(i for _, i, _, _ in kept), tuple(mean * score / best for _, _, score, mean in kept))


def replace_steers(source: Concept, target: Concept, strength: float = 1.0, **steer_options: Any) -> list[Steer]:
    """Detect-then-replace ``source`` by ``target``, as two steers for one :func:`~sae_core.steering.steer_function`.

    Both detect the tokens where any of ``source``'s positive-weight features fires (above ``detect_threshold``,
    default 0), read before either edits. There the first removes ``min(strength, 1)`` of those features'
    activations (ablate) and the second adds ``target`` at ``strength`` (raw units). Other tokens stay
    bit-identical. ``steer_options``: window, sigma_range, cond_only, subtract_uncond, mask, where,
    detect_threshold."""
    s = _finite(strength, "strength")
    if s < 0:
        raise SteerError(f"replace strength {s:g}: use >= 0 (0 = off, 1 = remove the source, add the target once)")
    if "detect" in steer_options:
        raise SteerError("replace detects with the source concept's own features; drop detect (use "
                         "detect_threshold to tune it)")
    detect = tuple(f for f, w in zip(source.features, source.weights) if w > 0)
    if not detect:
        raise SteerError("the source concept has no positive-weight feature to find its tokens by; build it with "
                         "sign='positive' or swap source and target")
    ablate = Steer(detect, (min(s, 1.0),), mode="ablate", detect=detect, **steer_options)
    return [ablate, target.steer(s, detect=detect, **steer_options)]


# ----------------------------------------------------------------------------- helpers


def _feature_id(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 0:
        raise SteerError(f"concept feature {value!r} is not a feature id (a whole number >= 0)")
    return int(value)


def _check_ids(dictionary: Dictionary, features: tuple[int, ...]) -> None:
    n = dictionary.n_latents
    outside = [f for f in features if f >= n]
    if outside:
        raise DictionaryError(f"concept feature {outside[0]} is out of range: this dictionary has {n} latents "
                              f"(0..{n - 1}); use the dictionary the concept was built with")


def _finite(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise SteerError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _top_n(top_n: Any) -> int:
    if isinstance(top_n, bool) or not isinstance(top_n, numbers.Integral) or top_n < 1:
        raise SteerError(f"top_n={top_n!r}: keep at least 1 feature (a whole number)")
    return int(top_n)


def _code_vector(codes: Any, name: str) -> Tensor:
    v = torch.as_tensor(codes).detach()
    if v.ndim != 1 or v.numel() == 0:
        raise SteerError(f"{name} mean codes must be one (n_latents,) vector, got shape {tuple(v.shape)}; "
                         "average the codes first (mean_codes)")
    v = v.to("cpu", torch.float64)
    if not bool(torch.isfinite(v).all()):
        raise SteerError(f"{name} mean codes hold NaN or inf; recompute them from finite activations")
    return v


def _row_weights(weights: Optional[Tensor], lead: torch.Size, device: torch.device) -> Optional[Tensor]:
    if weights is None:
        return None
    w = torch.as_tensor(weights).detach()
    n = math.prod(lead)
    if w.shape != lead and w.shape != (n,):
        raise SteerError(f"row weights shaped {tuple(w.shape)} do not fit the activations' rows {tuple(lead)}: give "
                         "one weight per row")
    w = w.reshape(-1).to(device, torch.float32)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not float(w.double().sum()) > 0:
        raise SteerError("row weights must be finite, >= 0 and not all 0")
    return w


def _coverage(dictionary: Dictionary, diff: Tensor, kept: Tensor) -> float:
    if diff.numel() != dictionary.n_latents:
        raise DictionaryError(f"the mean codes have {diff.numel()} latents but the dictionary has "
                              f"{dictionary.n_latents}; pass the dictionary that encoded them")
    rows = dictionary.rows.detach().to("cpu", torch.float64)
    std = dictionary.standardizer.std.detach().to("cpu", torch.float64)  # normalised -> model space, as direction()
    full = (diff @ rows * std).norm()
    part = (diff[kept] @ rows[kept] * std).norm()
    return float(part / full) if float(full) > 0 else math.nan


def _suggestions(listed: list[str], word: str) -> list[str]:
    """Words the index knows: the closest spellings first, then the most common."""
    counts: dict[str, int] = {}
    for words in listed:
        for w in words.lower().split():
            counts[w] = counts.get(w, 0) + 1
    common = sorted(counts, key=lambda w: (-counts[w], w))
    close = difflib.get_close_matches(word, common, n=3)
    return list(dict.fromkeys(close + common))[:SUGGESTED_WORDS] or ["(none: the index has no word statistics)"]


# ----------------------------------------------------------------------------- concepts per token position


@dataclass(frozen=True, eq=False)
class SpatialConcept:
    """A concept per token position: ``features`` and ``weights``, both ``(tokens, n)``, strongest first at each
    position; weights in mean-code units like :class:`Concept`'s."""

    features: Tensor
    weights: Tensor

    def __post_init__(self) -> None:
        features, weights = _feature_table(self.features, self.weights, "spatial", "(tokens, n)", "weights")
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "weights", weights)

    @property
    def tokens(self) -> int:
        return int(self.features.shape[0])

    def vectors(self, dictionary: Dictionary) -> Tensor:
        """``(tokens, d_in)`` float32: ``sum_f w[p, f] * dictionary.direction(f)`` at each position ``p``."""
        ids = sorted(set(self.features.flatten().tolist()))
        _check_ids(dictionary, tuple(ids))
        directions = torch.zeros(dictionary.n_latents, dictionary.d_in, dtype=torch.float64)
        directions[ids] = feature_directions(dictionary, ids).double()
        return torch.einsum("pn,pnd->pd", self.weights.double(), directions[self.features]).float()


def _feature_table(features: Any, values: Any, kind: str, shape: str, name: str) -> tuple[Tensor, Tensor]:
    """Checked copies of a per-position concept's feature ids (int64) and their values (float32), both ``shape``."""
    features, values = torch.as_tensor(features), torch.as_tensor(values)
    if features.ndim != shape.count(",") + 1 or features.shape != values.shape or features.numel() == 0:
        raise SteerError(f"a {kind} concept needs {shape} features and {name} of one shape, got "
                         f"{tuple(features.shape)} and {tuple(values.shape)}")
    if features.dtype.is_floating_point or bool((features < 0).any()):
        raise SteerError(f"{kind} concept features are non-negative integer feature ids")
    if not bool(torch.isfinite(values).all()):
        raise SteerError(f"{kind} concept {name} must be finite numbers")
    return features.long().clone(), values.float().clone()


def spatial_concept_from_codes(positive: Tensor, negative: Tensor, top_n: int) -> SpatialConcept:
    """The concept of ``positive - negative`` mean codes per position (``(tokens, n_latents)`` each): at every
    position the ``top_n`` features of largest ``|diff|``, weights ``diff`` there."""
    top_n = _top_n(top_n)
    pos, neg = torch.as_tensor(positive).double(), torch.as_tensor(negative).double()
    if pos.ndim != 2 or pos.shape != neg.shape:
        raise SteerError(f"per-position mean codes must be (tokens, n_latents) of one shape, got {tuple(pos.shape)} "
                         f"and {tuple(neg.shape)}: measure both at the same site and resolution")
    if not bool(torch.isfinite(pos).all() and torch.isfinite(neg).all()):
        raise SteerError("per-position mean codes must be finite")
    diff = pos - neg
    kept = diff.abs().topk(min(top_n, diff.shape[1]), dim=-1).indices
    return SpatialConcept(kept, diff.gather(1, kept))


def spatial_steer_function(dictionary: Dictionary, concept: SpatialConcept, strength: float = 1.0,
                           window: Window = None, cond_only: bool = True) -> SiteFunction:
    """A site function adding ``strength`` x the concept's vector of each position to that position's token, on
    the prompt's rows of guidance (every row with ``cond_only=False``), inside ``window``; elsewhere the input is
    returned as it is. A site with another number of tokens is refused (another resolution)."""
    s = _finite(strength, "strength")
    window = validate_window(window)
    vectors = concept.vectors(dictionary)

    def steer_site(h: Tensor, ctx: SiteContext) -> Tensor:
        if h.ndim != 3 or h.shape[1] != concept.tokens or h.shape[2] != vectors.shape[1]:
            raise SteerError(f"this spatial concept was measured on {concept.tokens} tokens of width "
                             f"{vectors.shape[1]}, the site has {tuple(h.shape[1:])}: sample at the resolution it "
                             "was measured at")
        if s == 0 or not in_window(ctx, window):
            return h
        return add_per_position(h, ctx, s * vectors, cond_only)

    return steer_site


def add_per_position(h: Tensor, ctx: SiteContext, vectors: Tensor, cond_only: bool = True) -> Tensor:
    """``h`` ``(rows, tokens, d)`` with ``vectors`` ``(tokens, d)`` added token by token on the prompt's rows of
    guidance (every row with ``cond_only=False``)."""
    rows = (prompt_rows(ctx, h.shape[0]) if cond_only else torch.arange(h.shape[0])).to(h.device)
    if len(rows) == 0:
        return h
    return h.index_add(0, rows, vectors.to(h.device, h.dtype).expand(len(rows), -1, -1))


# ----------------------------------------------------------------------------- clamped per step and position


@dataclass(frozen=True, eq=False)
class ScheduledConcept:
    """A concept per sampling step and token position, applied as a clamp.

    ``features`` ``(steps, tokens, n)``: at each measured step and position the ``n`` features whose mean code
    differs most between positive and negative examples; ``targets`` (same shape): the positive examples' mean
    code of each there; ``progress`` ``(steps,)``: where in sampling (0 first step, 1 last) each step was
    measured, increasing. A sampling step uses the nearest measured one, so another step count still works."""

    features: Tensor
    targets: Tensor
    progress: Tensor

    def __post_init__(self) -> None:
        features, targets = _feature_table(self.features, self.targets, "scheduled", "(steps, tokens, n)", "targets")
        progress = torch.as_tensor(self.progress).reshape(-1)
        if progress.numel() != features.shape[0] or not bool(torch.isfinite(progress).all()) \
                or bool((progress < 0).any() | (progress > 1).any()) or bool((progress.diff() <= 0).any()):
            raise SteerError(f"a scheduled concept needs one progress point in [0, 1] per step, increasing; got "
                             f"{progress.tolist()} for {features.shape[0]} step(s)")
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "progress", progress.double().clone())

    @property
    def steps(self) -> int:
        return int(self.features.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.features.shape[1])

    def step_at(self, progress: float) -> int:
        """The measured step nearest to ``progress``."""
        return int((self.progress - float(progress)).abs().argmin())


def scheduled_concept_from_codes(positive: Tensor, negative: Tensor, top_n: int,
                                 progress: Optional[Tensor] = None) -> ScheduledConcept:
    """The clamp concept of mean codes per step and position (``(steps, tokens, n_latents)`` each): at every step
    and position the ``top_n`` features of largest ``|positive - negative|``, clamped to ``positive`` there.
    ``progress``: each step's place in sampling; default evenly spaced from 0 to 1 (one step: 0)."""
    top_n = _top_n(top_n)
    pos, neg = torch.as_tensor(positive).float(), torch.as_tensor(negative).float()
    if pos.ndim != 3 or pos.shape != neg.shape:
        raise SteerError(f"per-step mean codes must be (steps, tokens, n_latents) of one shape, got "
                         f"{tuple(pos.shape)} and {tuple(neg.shape)}: measure both at the same site, resolution "
                         "and steps")
    if not bool(torch.isfinite(pos).all() and torch.isfinite(neg).all()):
        raise SteerError("per-step mean codes must be finite")
    kept = (pos - neg).abs().topk(min(top_n, pos.shape[-1]), dim=-1).indices
    if progress is None:
        progress = torch.linspace(0, 1, pos.shape[0]) if pos.shape[0] > 1 else torch.zeros(1)
    return ScheduledConcept(kept, pos.gather(-1, kept), progress)


def clamp_steer_function(dictionary: Dictionary, concept: ScheduledConcept, strength: float = 1.0,
                         window: Window = None, cond_only: bool = True,
                         mask: Optional[Tensor] = None) -> SiteFunction:
    """A site function moving, at each step and token position, the concept's features from the sample's own
    activation ``a`` toward the target ``t``: it adds ``strength * (t - a)`` of each feature's direction, so
    strength 1 clamps them (what the dictionary does not explain, and every other feature, stays). Acts on the
    prompt's rows of guidance (every row with ``cond_only=False``) inside ``window``; a site with another
    number of tokens is refused (another resolution), a context without a sampling position too. ``mask``: an
    ``(H, W)`` map in [0, 1] over the image scaling each token's edit (as :class:`~sae_core.steering.Steer`'s)."""
    s = _finite(strength, "strength")
    window = validate_window(window)
    weights = None if mask is None else checked_mask(mask)
    ids, slots = torch.unique(concept.features, return_inverse=True)  # the table holds only the concept's features
    _check_ids(dictionary, tuple(ids.tolist()))
    table = {torch.device("cpu"): feature_directions(dictionary, ids.tolist())}

    def steer_site(h: Tensor, ctx: SiteContext) -> Tensor:
        if h.ndim != 3 or h.shape[1] != concept.tokens or h.shape[2] != dictionary.d_in:
            raise SteerError(f"this concept was measured on {concept.tokens} tokens of width {dictionary.d_in}, "
                             f"the site has {tuple(h.shape[1:])}: sample at the resolution it was measured at")
        if s == 0 or not in_window(ctx, window):
            return h
        if ctx.progress is None:
            raise ScheduleError("a concept per sampling step needs to know the step: this runtime gives no "
                                "sampling progress at the site")
        rows = (prompt_rows(ctx, h.shape[0]) if cond_only else torch.arange(h.shape[0])).to(h.device)
        if len(rows) == 0:
            return h
        step = concept.step_at(ctx.progress)
        current = feature_activations(h.index_select(0, rows), dictionary, concept.features[step])
        change = s * (concept.targets[step].to(h.device) - current)  # (rows, tokens, n)
        if weights is not None:
            require_grid(ctx)
            change = change * mask_per_token(weights, ctx.grid, ctx.frames, concept.tokens).to(h.device)[None, :, None]
        if h.device not in table:  # moved once per device, not on every call
            table[h.device] = table[torch.device("cpu")].to(h.device)
        directions, slot = table[h.device], slots[step].to(h.device)
        added = torch.zeros(len(rows), concept.tokens, dictionary.d_in, device=h.device)
        for j in range(slot.shape[1]):
            added += change[..., j:j + 1] * directions[slot[:, j]]
        return h.index_add(0, rows, added.to(h.dtype))

    return steer_site


class StepCodeMeter:
    """A site function reading the dictionary's mean code at each sampling step and token position, on the prompt
    rows, without changing anything: what :func:`scheduled_concept_from_meters` is built from. Codes are kept
    sparse (k per token), so a wide dictionary at a large resolution never needs a dense
    ``(steps, tokens, n_latents)`` array: one step's ``(tokens, n_latents)`` mean at a time."""

    def __init__(self, dictionary: Dictionary):
        self.dictionary = dictionary
        self.parts: dict[float, list[tuple[Tensor, Tensor]]] = {}
        self.rows: dict[float, int] = {}
        self.tokens: Optional[int] = None

    def __call__(self, h: Tensor, ctx: SiteContext) -> Tensor:
        if ctx.progress is None:
            raise ScheduleError("measuring codes per sampling step needs the step: this runtime gives no sampling "
                                "progress at the site")
        rows = prompt_rows(ctx, h.shape[0]).to(h.device)
        if len(rows) == 0:
            return h
        if h.ndim != 3 or (self.tokens is not None and h.shape[1] != self.tokens):
            raise SteerError(f"the site's tokens changed while measuring ({self.tokens} then {tuple(h.shape)}): "
                             "measure every prompt at one resolution")
        self.tokens = h.shape[1]
        x = h.detach().index_select(0, rows).to(self.dictionary.rows.dtype)
        if not bool(torch.isfinite(x).all()):
            raise SteerError("the model produced NaN or inf at the site while measuring: the concept would be "
                             "meaningless; check the model and the sampler settings")
        with torch.no_grad():
            codes = self.dictionary.encode(x)
        key = round(float(ctx.progress), 6)
        self.parts.setdefault(key, []).append((codes.indices.cpu(), codes.values.float().cpu()))
        self.rows[key] = self.rows.get(key, 0) + len(rows)
        return h

    def progress(self, what: str) -> list[float]:
        """The measured steps' places in sampling, increasing."""
        if not self.parts:
            raise ScheduleError(f"sampling the {what} prompts never reached the site: check the site and the steps")
        return sorted(self.parts)

    def step_mean(self, progress: float) -> Tensor:
        """Mean codes ``(tokens, n_latents)`` float32 at one measured step."""
        out = torch.zeros(self.tokens, self.dictionary.n_latents)
        for indices, values in self.parts[progress]:
            out.scatter_add_(-1, indices.transpose(0, 1).reshape(self.tokens, -1),
                             values.transpose(0, 1).reshape(self.tokens, -1))
        return out / self.rows[progress]


def scheduled_concept_from_meters(positive: StepCodeMeter, negative: StepCodeMeter, top_n: int) -> ScheduledConcept:
    """:func:`scheduled_concept_from_codes` from two meters, one step at a time (only one dense
    ``(tokens, n_latents)`` mean per side is held at once)."""
    steps = positive.progress("positive")
    if steps != negative.progress("negative") or positive.tokens != negative.tokens:
        raise SteerError("the positive and negative prompts were measured at different steps or resolutions: "
                         "sample both with the same steps, scheduler and latent size")
    parts = [scheduled_concept_from_codes(positive.step_mean(p)[None], negative.step_mean(p)[None], top_n)
             for p in steps]
    return ScheduledConcept(torch.cat([c.features for c in parts]), torch.cat([c.targets for c in parts]),
                            torch.tensor(steps, dtype=torch.float64))
