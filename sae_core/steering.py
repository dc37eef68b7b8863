"""Steering: editing a site's activations along dictionary features.

Every edit here has the same form. For activations ``h: (batch, tokens, d)``
and features ``f`` with model-space directions ``v_f`` (the change one unit of
the feature's activation makes, :meth:`direction`), the edited activations are

    h'[b, t] = h[b, t] + sum_f c[b, t, f] * v_f

and the operations differ only in the coefficients ``c``:

* **add** (seed A, SDLens): ``c = s * scale``, the same for every token, where
  the *units* say what strength 1 means: ``token_norm``, the row's mean token
  norm along the *unit* direction (seed A adds 0.8 of it); ``mean_activation``,
  the feature's mean activation when it fires (SDLens uses strength ~10);
  ``raw``, one unit of activation.
* **clamp**: encode ``h``, read the feature's current activation ``a`` per token
  (0 where it is not selected) and set ``c = target - a``. Because decoding is
  affine in the codes, ``h + (target - a) v_f = decode(codes') + (h - decode(codes))``
  where ``codes'`` are the codes with the feature set to ``target``: this *is*
  encode -> edit -> decode, with the reconstruction error, everything the
  dictionary does not explain, kept instead of thrown away.
* **ablate**: clamp to 0 (the strength is the fraction removed, 0..1).
* **swap**: move a source feature's activation onto a target feature, token by
  token (``c_src = -s a_src``, ``c_dst = +s a_src``; ``s`` in 0..1).

Why offer more than addition: measured on a small Flux-architecture model
trained on a colour attribute, adding a colour feature everywhere flipped <= 6 %
of samples while moving the opposite colour's activation onto it where it
fired (clamp + ablate, error kept) flipped 28 %, and a difference-of-means
direction flipped 75 %. So steers can be confined to tokens where the feature
already fires (``where="where_active"``), and :func:`diff_of_means_direction`
with :func:`add_direction` gives the baseline every steer should be compared to.

:func:`steer_function` turns a list of :class:`Steer` into a site function
(see :mod:`sae_core.sites.context`) that gates each steer by noise level
(:mod:`sae_core.timesteps`), by CFG half, by a painted mask and by detection:
a steer with ``detect`` features edits only the tokens on which one of them
fires above ``detect_threshold``, read on the activations as they enter the
function. That is detect-then-replace: find a concept's tokens by its own
features, ablate those and add another concept there (see
:func:`sae_core.concepts.replace_steers`), leaving every other token alone.
Tokens an edit does not touch come back bit for bit, and when nothing is
touched the input tensor itself is returned, so a disabled or zero-strength
steer leaves the model's output bit-identical to the unpatched model.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .dictionary import Dictionary
from .errors import DictionaryError, SteerError
from .sites.context import SiteContext, SiteFunction
from .timesteps import Window, in_window, validate_sigma_range, validate_window

MODES = ("add", "clamp", "ablate", "swap")
UNITS = ("token_norm", "mean_activation", "raw")
WHERE = ("everywhere", "where_active")


# ----------------------------------------------------------------------------- building blocks


def _compute_dtype(h: Tensor) -> torch.dtype:
    return torch.promote_types(h.dtype, torch.float32)


def _check_activations(h: Tensor, d_in: int) -> None:
    if h.ndim != 3:
        raise SteerError(f"steering expects site activations shaped (batch, tokens, d), got {tuple(h.shape)}")
    if h.shape[-1] != d_in:
        raise DictionaryError(
            f"activations have width {h.shape[-1]} but the steering dictionary expects d_in={d_in}; "
            "use a dictionary trained on this site"
        )


def _check_features(dictionary: Dictionary, features: Sequence[int]) -> tuple[int, ...]:
    features = tuple(int(f) for f in features)
    if not features:
        raise SteerError("no features to steer: pick at least one feature id")
    n = dictionary.n_latents
    for f in features:
        if not 0 <= f < n:
            raise DictionaryError(f"feature {f} is out of range: this dictionary has {n} latents (0..{n - 1})")
    return features


def _strength_vector(strengths: Union[float, Sequence[float]], n: int, what: str = "feature") -> Tensor:
    values = [float(strengths)] if isinstance(strengths, (int, float)) else [float(s) for s in strengths]
    if len(values) == 1:
        values = values * n
    if len(values) != n:
        raise SteerError(f"got {len(values)} strengths for {n} {what}s: give one per {what}, or one for all")
    if not all(math.isfinite(v) for v in values):
        raise SteerError(f"strengths must be finite numbers, got {values}")
    return torch.tensor(values, dtype=torch.float32)


def _check_fractions(values: Sequence[float], mode: str) -> None:
    """Ablate removes, and swap moves, a fraction of a feature's activation: outside [0, 1] it would push the
    activation past zero (or add the feature), which only breaks images; say what does that job instead."""
    outside = [v for v in values if not 0.0 <= v <= 1.0]
    if outside:
        raise SteerError(f"{mode} strength {outside[0]:g}: it is the fraction of the feature's activation "
                         f"{'removed' if mode == 'ablate' else 'moved'}, 0..1 (1 = all); beyond that it only breaks "
                         "images: to push further, use add with a (negative) strength")


def mean_token_norm(h: Tensor) -> Tensor:
    """Mean L2 norm of the tokens of each row: ``(batch, tokens, d) -> (batch,)``, float32 or wider."""
    return h.to(_compute_dtype(h)).norm(dim=-1).mean(dim=-1)


def feature_directions(dictionary: Dictionary, features: Sequence[int]) -> Tensor:
    """Model-space directions ``(len(features), d)`` in float32, one per feature."""
    return torch.stack([dictionary.direction(f).detach().float().cpu() for f in features])


def feature_activations(h: Tensor, dictionary: Dictionary, features: Union[Sequence[int], Tensor]) -> Tensor:
    """Current activation of each feature on each token: ``(batch, tokens, F)``. ``features``: ``F`` ids read on
    every token, or a ``(tokens, F)`` table of ids per token.

    A feature the encoder did not select on a token reads 0 there."""
    with torch.no_grad():
        codes = dictionary.encode(h.to(_compute_dtype(h)))
    ids = torch.as_tensor(features, dtype=codes.indices.dtype, device=codes.indices.device)
    selected = codes.indices.unsqueeze(-1) == (ids if ids.ndim == 1 else ids.unsqueeze(1))  # (batch, tokens, k, F)
    return (codes.values.float().unsqueeze(-1) * selected).sum(dim=-2).to(h.device)


def recorded_mean_activations(dictionary: Dictionary, features: Sequence[int]) -> Tensor:
    """The dictionary's mean activation (when firing) of each feature, float32 ``(F,)``.

    Raises when a dictionary carries no firing statistics or a feature never
    fired, since "strength x 0" would silently do nothing."""
    stats = getattr(dictionary, "mean_activation", None)
    if stats is None:
        raise SteerError(
            "this dictionary records no mean activations: steer with units 'token_norm' or 'raw'"
        )
    values = torch.stack([stats[f].detach().float().cpu() for f in features])
    silent = [f for f, v in zip(features, values.tolist()) if not v > 0]
    if silent:
        raise SteerError(
            f"feature(s) {', '.join(map(str, silent))} have no recorded mean activation (never fired, or the file "
            "carries no firing statistics): steer with units 'token_norm' or 'raw'"
        )
    return values


def _token_weights(weights: Optional[Tensor], h: Tensor, n_features: int) -> Tensor:
    """Per-token (and optionally per-feature) weights as a tensor broadcastable to ``(batch, tokens, F)``."""
    if weights is None:
        return torch.ones(1, 1, 1, device=h.device)
    w = torch.as_tensor(weights, dtype=torch.float32, device=h.device)
    batch, tokens = h.shape[:2]
    if w.shape == (tokens,):
        return w.reshape(1, tokens, 1)
    if w.shape == (batch, tokens):
        return w.unsqueeze(-1)
    if w.shape == (batch, tokens, n_features):
        return w
    raise SteerError(
        f"token_weights shaped {tuple(w.shape)} do not fit activations {tuple(h.shape)} and {n_features} feature(s): "
        "give (tokens,), (batch, tokens) or (batch, tokens, features)"
    )


def apply_coefficients(h: Tensor, coefficients: Tensor, directions: Tensor) -> Tensor:
    """``h + coefficients @ directions`` on the tokens with a non-zero coefficient.

    ``coefficients`` broadcast to ``(batch, tokens, F)``; ``directions: (F, d)``.
    Computed in float32 (or wider) and returned in ``h``'s dtype; untouched tokens
    keep their exact bits, and if no token is touched ``h`` itself is returned."""
    touched = (coefficients != 0).any(dim=-1)
    if not bool(touched.any()):
        return h
    dtype = _compute_dtype(h)
    delta = coefficients.to(dtype) @ directions.to(device=h.device, dtype=dtype)
    edited = (h.to(dtype) + delta).to(h.dtype)
    return torch.where(touched.unsqueeze(-1), edited, h)


def _unit_activations(h: Tensor, directions: Tensor, units: str, mean_activation: Optional[Tensor]) -> Tensor:
    """Activation that strength 1 stands for, per row and feature: ``(batch or 1, F)``."""
    if units == "token_norm":
        norms = directions.to(h.device).norm(dim=-1).clamp_min(1e-12)
        return mean_token_norm(h).float().unsqueeze(-1) / norms
    if units == "mean_activation":
        return mean_activation.to(h.device).unsqueeze(0)
    return torch.ones(1, directions.shape[0], device=h.device)  # raw


def _add(h: Tensor, directions: Tensor, strengths: Tensor, units: str,
         mean_activation: Optional[Tensor], weights: Tensor) -> Tensor:
    """``weights`` broadcast to ``(batch, tokens, F)``."""
    if not bool(strengths.any()):
        return h
    amounts = _unit_activations(h, directions, units, mean_activation) * strengths.to(h.device)
    return apply_coefficients(h, amounts.unsqueeze(1) * weights, directions)


def _check_detect_range(dictionary: Dictionary, detect: Sequence[int]) -> tuple[int, ...]:
    n = dictionary.n_latents
    outside = [f for f in detect if not 0 <= f < n]
    if outside:
        raise DictionaryError(f"detect feature {outside[0]} is out of range: this dictionary has {n} latents "
                              f"(0..{n - 1})")
    return tuple(detect)


def _check_units(units: str) -> None:
    if units not in UNITS:
        raise SteerError(f"unknown steering units {units!r}: use one of {', '.join(UNITS)}")


# ----------------------------------------------------------------------------- the operations


def add_features(
    h: Tensor,
    dictionary: Dictionary,
    features: Sequence[int],
    strengths: Union[float, Sequence[float]],
    units: str = "token_norm",
    token_weights: Optional[Tensor] = None,
) -> Tensor:
    """``h + sum_f s_f * scale_f * v_f``, the same for every token (seed A, SDLens).

    ``units``: ``"token_norm"`` (``s`` times the row's mean token norm along the
    unit direction; seed A uses 0.8), ``"mean_activation"`` (``s`` times the
    feature's mean activation; SDLens uses ~10) or ``"raw"`` (``s`` units of
    activation). ``token_weights`` of shape ``(tokens,)``, ``(batch, tokens)`` or
    ``(batch, tokens, features)``, in [0, 1], scale the edit per token (a
    negative weight negates it). All-zero strengths return ``h`` itself.
    """
    features = _check_features(dictionary, features)
    _check_units(units)
    _check_activations(h, dictionary.d_in)
    strengths_t = _strength_vector(strengths, len(features))
    mean_activation = recorded_mean_activations(dictionary, features) if units == "mean_activation" else None
    weights = _token_weights(token_weights, h, len(features))
    return _add(h, feature_directions(dictionary, features), strengths_t, units, mean_activation, weights)


def add_direction(
    h: Tensor,
    direction: Tensor,
    strength: float,
    units: str = "token_norm",
    token_weights: Optional[Tensor] = None,
) -> Tensor:
    """Add any model-space ``direction: (d,)``: the diff-of-means baseline and the random control.

    ``units``: ``"token_norm"`` (``strength`` x the row's mean token norm along
    the unit direction) or ``"raw"`` (``strength`` x ``direction`` as given)."""
    if units not in ("token_norm", "raw"):
        raise SteerError(f"a plain direction is added in units 'token_norm' or 'raw', not {units!r}")
    direction = torch.as_tensor(direction).detach().float().reshape(1, -1).cpu()
    _check_activations(h, direction.shape[-1])
    return _add(h, direction, _strength_vector(strength, 1), units, None, _token_weights(token_weights, h, 1))


def clamp_features(
    h: Tensor,
    dictionary: Dictionary,
    features: Sequence[int],
    values: Union[float, Sequence[float], Tensor],
    token_weights: Optional[Tensor] = None,
) -> Tensor:
    """Set each feature's activation to ``values`` (activation units), keeping the reconstruction error.

    Returns ``h + sum_f (target_f - a_f) * v_f * weight`` where ``a_f`` is the
    feature's current activation per token (0 where not selected). Since decode
    is affine in the codes, this equals ``decode(edited codes) + (h - decode(codes))``:
    encode -> edit -> decode with everything the dictionary does not explain kept.
    ``values``: one per feature, one for all, or ``(batch, features)`` per row.
    """
    features = _check_features(dictionary, features)
    _check_activations(h, dictionary.d_in)
    targets = _clamp_targets(values, h.shape[0], len(features)).to(h.device)
    current = feature_activations(h, dictionary, features)
    coefficients = (targets.unsqueeze(1) - current) * _token_weights(token_weights, h, len(features))
    return apply_coefficients(h, coefficients, feature_directions(dictionary, features))


def _clamp_targets(values: Union[float, Sequence[float], Tensor], batch: int, n: int) -> Tensor:
    if isinstance(values, Tensor) and values.ndim == 2:
        if values.shape != (batch, n):
            raise SteerError(f"per-row clamp values must be (batch, features) = ({batch}, {n}), got {tuple(values.shape)}")
        return values.float()
    values = values.tolist() if isinstance(values, Tensor) else values
    return _strength_vector(values, n).unsqueeze(0)


def ablate_features(
    h: Tensor,
    dictionary: Dictionary,
    features: Sequence[int],
    token_weights: Optional[Tensor] = None,
) -> Tensor:
    """Remove features: :func:`clamp_features` to 0 (a weight of 0.5 removes half)."""
    return clamp_features(h, dictionary, features, 0.0, token_weights)


def swap_features(
    h: Tensor,
    dictionary: Dictionary,
    source: int,
    target: int,
    strength: float = 1.0,
    token_weights: Optional[Tensor] = None,
) -> Tensor:
    """Move ``strength`` x the source feature's activation onto the target feature, token by token.

    The source loses ``s * a_src`` and the target gains it, only where the source
    fires; the reconstruction error is kept as in :func:`clamp_features`."""
    features = _check_features(dictionary, (source, target))
    _check_activations(h, dictionary.d_in)
    _check_fractions([float(strength)], "swap")
    current = feature_activations(h, dictionary, features)
    coefficients = _swap_coefficients(current, _strength_vector(strength, 1).to(h.device))
    coefficients = coefficients * _token_weights(token_weights, h, 2)
    return apply_coefficients(h, coefficients, feature_directions(dictionary, features))


def _swap_coefficients(current: Tensor, strengths: Tensor) -> Tensor:
    """``current: (batch, tokens, 2P)`` of (source, target) pairs; ``strengths: (P,)``."""
    moved = current[..., 0::2] * strengths
    return torch.stack([-moved, moved], dim=-1).flatten(-2)


def diff_of_means_direction(acts_a: Tensor, acts_b: Tensor) -> Tensor:
    """``mean(acts_a) - mean(acts_b)`` over all tokens, ``(d,)`` float32: the baseline steer.

    E.g. activations on "red" prompts minus "blue" prompts; add it with
    :func:`add_direction` (anchors.md: 0.5 x token norm flipped 75 % blue -> red)."""
    a = torch.as_tensor(acts_a).detach()
    b = torch.as_tensor(acts_b).detach()
    if a.shape[-1] != b.shape[-1]:
        raise SteerError(f"the two activation sets have widths {a.shape[-1]} and {b.shape[-1]}: take both from one site")
    if a.numel() == 0 or b.numel() == 0:
        raise SteerError("diff of means needs activations in both sets: one of them is empty")
    mean_a = a.reshape(-1, a.shape[-1]).double().mean(0)
    mean_b = b.reshape(-1, b.shape[-1]).double().mean(0)
    return (mean_a - mean_b).float()


# ----------------------------------------------------------------------------- steers


def _as_tuple(values: Union[int, float, Sequence]) -> tuple:
    return (values,) if isinstance(values, (int, float)) else tuple(values)


@dataclass(frozen=True, eq=False)
class Steer:
    """One edit of a site's activations, as a node or a script describes it.

    ``features`` / ``strengths``: feature ids and one strength per feature (or
    one for all). For ``mode="swap"`` features come in (source, target) pairs
    and strengths one per pair. What a strength means: ``add``, in ``units``;
    ``clamp``, the target activation in ``units``; ``ablate`` and ``swap``, the
    fraction of the activation removed or moved (1 = all; units ignored).
    ``window`` (progress 0..1) and ``sigma_range``: when it acts, inclusive.
    ``cond_only``: only rows of the positive prompt; ``subtract_uncond``: also
    apply the negated edit to the uncond rows (SDLens under CFG; takes
    precedence over ``cond_only`` for those rows). When the adapter cannot tell
    cond from uncond rows every row counts as cond.
    ``mask``: ``(H, W)`` weights in [0, 1] over the image, resized to the token
    grid. ``where="where_active"``: only tokens on which the feature already
    fires (swap always acts only where its source fires).
    ``detect``: feature ids that locate the concept's tokens; when given, only
    tokens on which at least one of them reads more than ``detect_threshold``
    (activation units, >= 0; a feature not selected reads 0) are edited, on top
    of every other gate. Detection reads the activations as they enter the site
    function, so steers of one :func:`steer_function` that share a detect set
    act on the same tokens whatever their order (detect-then-replace).
    """

    features: tuple[int, ...]
    strengths: tuple[float, ...]
    mode: str = "add"
    units: str = "token_norm"
    window: Optional[Window] = None
    sigma_range: Optional[Window] = None
    cond_only: bool = True
    subtract_uncond: bool = False
    mask: Optional[Tensor] = None
    where: str = "everywhere"
    detect: tuple[int, ...] = ()
    detect_threshold: float = 0.0

    def __post_init__(self) -> None:
        features = tuple(int(f) for f in _as_tuple(self.features))
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "strengths", tuple(float(s) for s in _as_tuple(self.strengths)))
        object.__setattr__(self, "window", validate_window(self.window))
        object.__setattr__(self, "sigma_range", validate_sigma_range(self.sigma_range))
        if self.mode not in MODES:
            raise SteerError(f"unknown steering mode {self.mode!r}: use one of {', '.join(MODES)}")
        _check_units(self.units)
        if self.where not in WHERE:
            raise SteerError(f"unknown steering target {self.where!r}: use one of {', '.join(WHERE)}")
        if not features:
            raise SteerError("this steer lists no features: pick at least one feature id")
        duplicated = sorted({f for f in features if features.count(f) > 1})
        if duplicated:
            raise SteerError(f"feature(s) {', '.join(map(str, duplicated))} listed twice in one steer: list each once")
        if self.mode == "swap" and len(features) % 2:
            raise SteerError("swap takes (source, target) pairs of features: give an even number of feature ids")
        _strength_vector(self.strengths, self.n_strengths, "pair" if self.mode == "swap" else "feature")
        if self.mode in ("ablate", "swap"):
            _check_fractions(self.strengths, self.mode)
        if self.mask is not None:
            object.__setattr__(self, "mask", checked_mask(self.mask))
        object.__setattr__(self, "detect", _checked_detect(self.detect))
        object.__setattr__(self, "detect_threshold", _checked_threshold(self.detect_threshold))

    @property
    def n_strengths(self) -> int:
        return len(self.features) // 2 if self.mode == "swap" else len(self.features)

    @property
    def is_inert(self) -> bool:
        """True when the steer cannot change anything: zero strengths for add, ablate and swap."""
        return self.mode != "clamp" and not any(self.strengths)


def _checked_detect(detect: Union[int, Sequence[int]]) -> tuple[int, ...]:
    values = (detect,) if isinstance(detect, numbers.Integral) else tuple(detect)
    if any(isinstance(f, bool) or not isinstance(f, numbers.Integral) for f in values):
        raise SteerError(f"detect lists feature ids, whole numbers, got {list(values)}: give ids like (12, 40)")
    ids = tuple(int(f) for f in values)
    duplicated = sorted({f for f in ids if ids.count(f) > 1})
    if duplicated:
        raise SteerError(f"detect feature(s) {', '.join(map(str, duplicated))} listed twice: list each once")
    return ids


def _checked_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise SteerError(f"detect_threshold must be a number (activation units), got {threshold!r}")
    value = float(threshold)
    if not math.isfinite(value) or value < 0:
        raise SteerError(f"detect_threshold {value:g}: use a finite activation >= 0 (0 = the feature fires at all)")
    return value


def checked_mask(mask: Tensor) -> Tensor:
    """An ``(H, W)`` steering mask as float32 on the CPU, or SteerError saying what is wrong with it."""
    m = torch.as_tensor(mask).detach().float().cpu()
    if m.ndim != 2:
        raise SteerError(f"a steering mask is an (H, W) map, got shape {tuple(m.shape)}: pass one mask, not a batch")
    if m.numel() == 0:
        raise SteerError(f"the mask has no pixels (shape {tuple(m.shape)}): paint the region to steer")
    if not torch.isfinite(m).all() or m.min() < 0 or m.max() > 1:
        raise SteerError("mask values must lie in [0, 1]: use a painted mask, not an image")
    if not bool(m.any()):
        raise SteerError("the mask is empty: paint the region to steer")
    return m.clone()


def mask_to_tokens(mask: Tensor, grid: tuple[int, int]) -> Tensor:
    """Resize an ``(H, W)`` mask to the token grid ``(rows, cols)`` and flatten it row-major.

    Shrinking averages the covered area (so a thin stroke still counts in
    proportion); growing interpolates bilinearly."""
    rows, cols = grid
    m = mask.float()[None, None]
    if m.shape[-2] >= rows and m.shape[-1] >= cols:
        resized = F.interpolate(m, size=(rows, cols), mode="area")
    else:
        resized = F.interpolate(m, size=(rows, cols), mode="bilinear", align_corners=False)
    return resized.reshape(rows * cols).clamp(0.0, 1.0)


def require_grid(ctx: SiteContext) -> None:
    """SteerError unless the site's tokens lie on an image grid (what a mask is resized to)."""
    if ctx.grid is None:
        raise SteerError("a steering mask needs image tokens, but this site's tokens have no grid (text tokens): "
                         "remove the mask or steer an image stream")


def mask_per_token(mask: Tensor, grid: tuple[int, int], frames: int, tokens: int) -> Tensor:
    """The mask's weight on each of the site's ``tokens``: a video's tokens are ``frames`` grids one after
    another, each masked alike; SteerError when the grid does not cover the tokens."""
    if frames * grid[0] * grid[1] != tokens:
        raise SteerError(f"the token grid {frames}x{grid[0]}x{grid[1]} does not match the site's {tokens} tokens; "
                         "the model adapter reported a wrong grid")
    return mask_to_tokens(mask, grid).repeat(frames)


class _Plan:
    """A validated steer bound to a dictionary, with its directions computed once."""

    def __init__(self, dictionary: Dictionary, steer: Steer):
        self.dictionary = dictionary
        self.steer = steer
        self.features = _check_features(dictionary, steer.features)
        self.detect = _check_detect_range(dictionary, steer.detect)
        self.strengths = _strength_vector(steer.strengths, steer.n_strengths)
        self.directions = feature_directions(dictionary, self.features)
        uses_mean = steer.units == "mean_activation" and steer.mode in ("add", "clamp")
        self.mean_activation = recorded_mean_activations(dictionary, self.features) if uses_mean else None
        self.reads_current = not (steer.mode == "add" and steer.where == "everywhere")
        # One encode reads both the steered features and the detect features (on tokens no steer edited yet).
        self.read_ids = self.features + tuple(f for f in self.detect if f not in self.features)
        self.detect_columns = [self.read_ids.index(f) for f in self.detect]
        self._mask_cache: dict[tuple, Tensor] = {}

    def __call__(self, h: Tensor, ctx: SiteContext, entry: Tensor, detections: dict) -> Tensor:
        """``entry``: the activations as they entered the site function; ``detections``: this call's detected
        tokens per (detect set, rows), shared by the steers of one function."""
        steer = self.steer
        if steer.mask is not None:
            require_grid(ctx)
        if steer.is_inert or not in_window(ctx, steer.window, steer.sigma_range):
            return h
        rows = _row_weights(ctx.cond, h.shape[0], steer)
        selected = rows.nonzero().flatten()
        if len(selected) == 0:
            return h
        whole = len(selected) == h.shape[0]
        index = selected.to(h.device)
        part = h if whole else h.index_select(0, index)
        fresh = h is entry  # no earlier steer edited these activations: detection may share this plan's encode
        detected, current = self._detect(part, entry, selected, index, fresh, detections)
        if detected is not None and not bool(detected.any()):
            return h
        weights = self._weights(rows[selected], ctx, part)
        if detected is not None:
            weights = weights * detected.unsqueeze(-1)
        # Edit (and encode) only the selected rows, e.g. the cond half under CFG.
        edited = self._edit(part, weights, current)
        if whole:
            return edited
        return h if edited is part else h.index_copy(0, index, edited)

    def _detect(self, part: Tensor, entry: Tensor, selected: Tensor, index: Tensor, fresh: bool,
                detections: dict) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(detected tokens of the selected rows ``(rows, tokens)`` bool, or None without ``detect``; the steered
        features' activations on ``part`` when the same encode read them, else None)."""
        if not self.detect:
            return None, None
        rows = tuple(selected.tolist())
        key = (self.detect, self.steer.detect_threshold, rows)
        current = None
        if key not in detections:
            if fresh and self.reads_current:
                read = feature_activations(part, self.dictionary, self.read_ids)
                current, read = read[..., :len(self.features)], read[..., self.detect_columns]
            else:
                whole = len(rows) == entry.shape[0]
                before = part if fresh else (entry if whole else entry.index_select(0, index))
                read = feature_activations(before, self.dictionary, self.detect)
            detections[key] = (read > self.steer.detect_threshold).any(dim=-1)
        return detections[key], current

    def _weights(self, rows: Tensor, ctx: SiteContext, h: Tensor) -> Tensor:
        weights = rows.to(h.device).reshape(-1, 1, 1)
        if self.steer.mask is not None:
            weights = weights * self._mask_weights(ctx.grid, ctx.frames, h).reshape(1, -1, 1)
        return weights

    def _edit(self, h: Tensor, weights: Tensor, current: Optional[Tensor]) -> Tensor:
        """``current``: the steered features' activations on ``h`` when already read, else None."""
        steer = self.steer
        mode = steer.mode
        if not self.reads_current:
            return _add(h, self.directions, self.strengths, steer.units, self.mean_activation, weights)
        if current is None:
            current = feature_activations(h, self.dictionary, self.features)
        if steer.where == "where_active" and mode != "swap":
            weights = weights * (current > 0)
        strengths = self.strengths.to(h.device)
        if mode == "add":
            coefficients = _unit_activations(h, self.directions, steer.units, self.mean_activation) * strengths
            coefficients = coefficients.unsqueeze(1)
        elif mode == "clamp":
            targets = _unit_activations(h, self.directions, steer.units, self.mean_activation) * strengths
            coefficients = targets.unsqueeze(1) - current
        elif mode == "ablate":
            coefficients = -current * strengths
        else:
            coefficients = _swap_coefficients(current, strengths)
        return apply_coefficients(h, coefficients * weights, self.directions)

    def _mask_weights(self, grid: tuple[int, int], frames: int, h: Tensor) -> Tensor:
        """The mask per token; a video's tokens are ``frames`` grids one after another, each masked alike."""
        key = (tuple(grid), frames, h.device)
        if key not in self._mask_cache:
            self._mask_cache[key] = mask_per_token(self.steer.mask, grid, frames, h.shape[1]).to(h.device)
        return self._mask_cache[key]


def _row_weights(cond: Optional[Tensor], batch: int, steer: Steer) -> Tensor:
    """(batch,) float on the CPU: +1 for rows to edit, -1 for rows to edit negated, 0 to leave."""
    if cond is None:
        return torch.ones(batch)
    cond = torch.as_tensor(cond).detach().reshape(-1).bool().cpu()
    if cond.numel() != batch:
        raise SteerError(
            f"the site context marks {cond.numel()} rows as cond/uncond but the batch has {batch}; "
            "the model adapter is out of step"
        )
    uncond = -1.0 if steer.subtract_uncond else (0.0 if steer.cond_only else 1.0)
    return torch.where(cond, torch.tensor(1.0), torch.tensor(uncond))


def steer_function(dictionary: Dictionary, steers: Sequence[Steer]) -> SiteFunction:
    """A site function applying ``steers`` in order (each sees the previous one's result).

    All validation happens here, before sampling starts. The function never
    modifies its input in place; when no steer changes anything at a call
    (gates closed, zero strengths, no rows or tokens selected) it returns the
    input tensor itself.
    """
    plans = [_Plan(dictionary, steer) for steer in steers]

    def steer_site(h: Tensor, ctx: SiteContext) -> Tensor:
        _check_activations(h, dictionary.d_in)
        entry, detections = h, {}
        for plan in plans:
            h = plan(h, ctx, entry, detections)
        return h

    return steer_site
