"""Other projects' dictionary layouts, read into our modules; export to SAELens.

Each ``load_*`` reader takes a local folder and returns a module that computes
exactly the formula the other project publishes, written in our terms
(``pre = W_enc (x - b_dec·subtract) + b_enc``, then the kind's selection,
``x_hat = f W_dec + b_dec``; see :mod:`sae_core.sae`). Weights are converted to
float32; a file with NaN/inf weights is refused, naming the tensor. Settings are
read with their JSON type (``"false"`` is not false, 3.7 is not a k: both are
refused, never coerced), tensors with their exact rank and shape (a ``(1,)`` bias
would broadcast into another function), and sizes a config states must be the
weights' sizes.

**SAELens** (``cfg.json`` + ``sae_weights.safetensors``)
    Tensors ``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec``
    and, for JumpReLU, ``threshold``. With ``x' = x - b_dec`` when
    ``apply_b_dec_to_input`` (the SAELens default) else ``x``::

        pre   = x' @ W_enc + b_enc
        f     = relu(pre)                   architecture "standard"
              = relu(topk(pre, k))          "topk" (k from cfg "k" or activation_fn_kwargs)
              = relu(pre) * (pre > threshold)   "jumprelu"
        x_hat = f @ W_dec + b_dec

    "batchtopk" (a SAELens training checkpoint) is the JumpReLU form with the
    scalar ``topk_threshold``, which is what SAELens itself saves for inference;
    it loads as our ``batchtopk`` kind. SAELens 5.x configs say TopK as
    architecture "standard" with ``activation_fn_str: "topk"``. Two options are
    folded into the weights, leaving codes and reconstructions unchanged:
    ``finetuning_scaling_factor`` (``f * s`` before decoding: ``W_dec *= s``)
    and ``rescale_acts_by_decoder_norm`` (``pre * |W_dec|`` then ``f / |W_dec|``:
    scale ``W_enc``, ``b_enc`` up and ``W_dec`` down by the row norms).
    Gated SAEs and run-time activation normalisation are refused.
    ``metadata`` (SAELens 6; "meta" in some 6.x releases, top level before)
    ``model_name``/``hook_name`` go to ``Site.extra``; a file exported by us
    carries its whole site there and gets it back.

**EleutherAI sparsify** (``cfg.json`` + ``sae.safetensors``)
    ``encoder.weight (n, d)``, ``encoder.bias (n)``, ``W_dec (n, d)``, ``b_dec (d)``::

        f = topk(relu(encoder(x - b_dec)), k);   x_hat = f @ W_dec + b_dec

    (``relu`` then ``topk`` selects the same values as ``topk`` then ``relu``.)
    ``n`` comes from the weights (cfg ``num_latents`` may be 0, meaning
    ``expansion_factor * d_in``). Transcoders, skip connections (``W_skip``)
    and the "groupmax" activation are refused: they are not an autoencoder of
    one site with a TopK code.

**SDLens / sdxl-unbox** (``config.json`` + ``state_dict.pth`` [+ ``mean.pt``, ``std.pt``])
    ``{"state_dict": {...}}`` or the bare dict: ``encoder.weight (n, d)``,
    ``decoder.weight (d, n)``, ``pre_bias (d)``, ``latent_bias (n)``::

        f = relu(topk(encoder(x - pre_bias) + latent_bias, k));   x_hat = decoder(f) + pre_bias

    (``encoder`` has no bias in SDLens; an ``encoder.bias``, if present, is added too.)

    ``mean.pt``/``std.pt`` of length n are per-feature activation statistics:
    the mean becomes ``mean_activation`` (steering "times the feature's mean
    activation"); of length d they standardise the input, ``(x - mean) / std``,
    and become the standardizer. Length n is tried first, as SDLens ships it.

**Seed-A ITDA** (kisate/flux-saes-gpu: ``cfg.json`` + ``sae.safetensors``)
    ``xs``/``ys (capacity, d)`` of which only the first ``dictionary_size`` rows
    are atoms (the rest is uninitialised growth room), ``mean_x``/``mean_y``,
    ``weight`` (skip connection only), optionally ``std_x``. Encoding is
    gradient pursuit of ``x - mean_x`` (when ``subtract_mean``; divided by
    ``std_x`` when present) over the atoms to ``target_l0``; decoding undoes
    it. Loaded as our ITDA with unit-norm atoms; ``loss_threshold`` is kept
    when it is a relative loss (``fvu_loss``), the cfg goes to ``metadata``.
    Refused when it is not an autoencoder (``ys``/``mean_y`` differ from
    ``xs``/``mean_x``, ``add_error`` or ``skip_connection``).

Pickled files (``.pth``/``.pt``) are read only with ``torch.load(...,
weights_only=True)``: tensors and plain containers, never arbitrary objects.

:func:`export_saelens` writes a :class:`SparseAutoencoder` in SAELens' layout with
the standardizer and ``b_dec`` folded in, so SAELens computes our function on
raw model activations.
"""
from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from .atomic import atomic_write, save_safetensors_atomic
from .checks import flag, listed, mapping, printable, real_number, short_reason, text, whole_number
from .errors import DictionaryError, SiteError
from .fileformat import Dictionary, check_finite
from .itda import ITDA
from .normalize import Standardizer, check_statistics
from .sae import SparseAutoencoder
from .sites.site import Site

SAELENS_FILES = ("cfg.json", "sae_weights.safetensors")
SPARSIFY_FILES = ("cfg.json", "sae.safetensors")  # seed-A ITDA uses the same two names
SDLENS_FILES = ("config.json", "state_dict.pth")
SDLENS_STATISTICS = ("mean.pt", "std.pt")
SEED_ITDA_KEYS = ("target_l0", "dictionary_size")
"""cfg.json keys that only seed-A ITDA writes: they tell it apart from sparsify."""

T = TypeVar("T")
_REQUIRED: Any = object()


# --- reading files ---------------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:  # ValueError: not UTF-8, not JSON, an int too long to read
        raise DictionaryError(f"{path}: cannot read this JSON config ({short_reason(err)}); re-download the dictionary") from err
    if not isinstance(data, dict):
        raise DictionaryError(f"{path}: expected a JSON object of settings; re-download the dictionary")
    return data


def read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise DictionaryError(f"{path} is truncated or not a valid safetensors file ({short_reason(err)}); re-download or re-save it") from err


def read_pickled_tensors(path: Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers: unpickling an
    arbitrary object can run code, so files that need it are refused.

    PyTorch reports a forbidden object and a damaged pickle with the same
    exception, so the message covers both. Damaged bytes make its reader trip
    over anything (RuntimeError, KeyError, IndexError, AssertionError, ...);
    all of them mean the same to the user, so all are caught here."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise DictionaryError(
            f"{path} holds pickled Python objects besides tensors (or is damaged); refusing to unpickle arbitrary "
            "objects, which can run code: re-save it as tensors (torch.save(sae.state_dict())) or as safetensors"
        ) from err
    except Exception as err:
        raise DictionaryError(f"{path} is truncated or not a PyTorch tensor file ({short_reason(err)}); re-download it") from err


def _tensor(tensors: dict[Any, Any], name: str, path: Path, rank: int | None) -> Tensor:
    """Tensor ``name`` as float32; it must hold floating-point values and have ``rank`` dimensions
    (None: checked by the caller), since a tensor of another rank would broadcast into a wrong function."""
    value = tensors.get(name)
    if not isinstance(value, Tensor):
        raise DictionaryError(f"{path} has no tensor '{name}' (found: {listed(tensors)}); it is not in the expected layout")
    if not value.is_floating_point():
        raise DictionaryError(f"{path}: tensor '{name}' holds {value.dtype} values, not weights; the file is damaged, re-download it")
    if rank is not None and value.dim() != rank:
        raise DictionaryError(
            f"{path}: tensor '{name}' has shape {tuple(value.shape)} but must have {rank} dimension(s); the file is damaged, re-download it"
        )
    return value.detach().float()


def _setting(cfg: dict[str, Any], name: str, check: Callable[[Any, str], T], path: Path, default: Any = _REQUIRED) -> T:
    """Setting ``name`` of a foreign config, as ``check(value, name)`` accepts it; ``default`` when it is
    absent or null (or refused as missing when there is none). A value of another type is refused,
    never coerced: ``"false"`` is not false."""
    value = cfg.get(name)
    if value is None:
        if default is _REQUIRED:
            raise DictionaryError(f"{path} has no '{name}' setting; the config is incomplete, re-download the dictionary")
        return default
    try:
        return check(value, name)
    except DictionaryError as err:
        raise DictionaryError(f"{path}: {err}; the config is damaged, re-download the dictionary") from err


def _positive(value: Any, name: str) -> int:
    return whole_number(value, name, 1)


def _count(value: Any, name: str) -> int:
    return whole_number(value, name, 0)


def _check_declared_sizes(cfg: dict[str, Any], actual: dict[str, int], path: Path, unset: tuple[Any, ...] = (None,)) -> None:
    """Sizes a config states (when it does) must be the weights' sizes; ``unset`` values state nothing."""
    for name, size in actual.items():
        declared = _setting(cfg, name, _count, path, default=None)
        if declared not in (*unset, size):
            raise DictionaryError(f"{path}: {name}={declared} but the weights have {size}; the config does not match the weights, re-download the dictionary")


# --- building our modules --------------------------------------------------------------------


def _sae(
    path: Path,
    kind: str,
    weights: dict[str, Tensor],
    k: int,
    *,
    subtract_decoder_bias: bool,
    site: Site,
    standardizer: Standardizer | None = None,
) -> SparseAutoencoder:
    """Our module around foreign weights in our orientation: ``W_enc``, ``W_dec`` both ``(n, d)``.

    Shapes must be exact: a ``(1,)`` bias or threshold would broadcast into another function. Only
    BatchTopK's threshold is one global value by definition, stored as a scalar or per latent."""
    w_enc, b_enc, w_dec, b_dec = (weights[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec"))
    n, d = w_dec.shape
    if w_enc.shape != (n, d) or b_enc.shape != (n,) or b_dec.shape != (d,):
        raise DictionaryError(
            f"{path}: inconsistent shapes (encoder {tuple(w_enc.shape)}, decoder {tuple(w_dec.shape)}, "
            f"encoder bias {tuple(b_enc.shape)}, decoder bias {tuple(b_dec.shape)}); the file is damaged, re-download it"
        )
    if kind in ("topk", "batchtopk") and not 0 < k <= n:
        raise DictionaryError(f"{path}: k={k} must be between 1 and the {n} latents; the config does not match the weights")
    if "threshold" in weights:
        threshold = weights["threshold"]
        allowed = ((), (1,), (n,)) if kind == "batchtopk" else ((n,),)
        if tuple(threshold.shape) not in allowed:
            raise DictionaryError(f"{path}: threshold has shape {tuple(threshold.shape)} for {n} latents; the file is damaged, re-download it")
        weights = {**weights, "threshold": threshold.reshape(-1).expand(n)}
    sae = SparseAutoencoder(d, n, k, kind, site=site, standardizer=standardizer,
                            subtract_decoder_bias=subtract_decoder_bias, seed=None)
    with torch.no_grad():
        for name, value in weights.items():
            getattr(sae, name).copy_(value)
    return sae


def _checked(dictionary: Dictionary, path: Path) -> Dictionary:
    check_finite(dictionary, path)
    check_statistics(dictionary.standardizer, dictionary.d_in, str(path))
    return dictionary


# --- SAELens ---------------------------------------------------------------------------------


def load_saelens(folder: Path) -> SparseAutoencoder:
    """A SAELens folder (see the module docstring for the formula)."""
    cfg_path = folder / "cfg.json"
    cfg = read_json(cfg_path)
    _check_saelens_normalisation(cfg, folder)
    kind = _saelens_kind(cfg, cfg_path, folder)
    k = _saelens_k(cfg, kind, cfg_path) if kind in ("topk", "batchtopk") else 1  # relu/jumprelu: k is a label
    subtract = _setting(cfg, "apply_b_dec_to_input", flag, cfg_path, default=True)
    scaled = _setting(cfg, "finetuning_scaling_factor", flag, cfg_path, default=False)
    rescaled = _setting(cfg, "rescale_acts_by_decoder_norm", flag, cfg_path, default=False)
    site = _saelens_site(cfg, cfg_path)
    path = folder / "sae_weights.safetensors"
    tensors = read_safetensors(path)
    weights = {
        "W_enc": _tensor(tensors, "W_enc", path, 2).T,
        "b_enc": _tensor(tensors, "b_enc", path, 1),
        "W_dec": _tensor(tensors, "W_dec", path, 2),
        "b_dec": _tensor(tensors, "b_dec", path, 1),
    }
    if kind == "jumprelu":
        weights["threshold"] = _tensor(tensors, "threshold", path, 1)
    if kind == "batchtopk":
        weights["threshold"] = _tensor(tensors, "topk_threshold" if "topk_threshold" in tensors else "threshold", path, None)
    if scaled:
        weights["W_dec"] = weights["W_dec"] * _latent_vector(tensors, "finetuning_scaling_factor", weights["W_dec"], path)[:, None]
    if rescaled:
        norms = weights["W_dec"].norm(dim=-1)
        weights.update(W_enc=weights["W_enc"] * norms[:, None], b_enc=weights["b_enc"] * norms,
                       W_dec=weights["W_dec"] / norms.clamp_min(1e-12)[:, None])
    sae = _sae(path, kind, weights, k, site=site, subtract_decoder_bias=subtract)
    _check_declared_sizes(cfg, {"d_in": sae.d_in, "d_sae": sae.n_latents}, cfg_path)
    return _checked(sae, path)


def _latent_vector(tensors: dict[str, Tensor], name: str, w_dec: Tensor, path: Path) -> Tensor:
    """A per-latent tensor, exactly ``(n,)``."""
    value = _tensor(tensors, name, path, 1)
    if value.shape != w_dec.shape[:1]:
        raise DictionaryError(f"{path}: tensor '{name}' has shape {tuple(value.shape)} for {w_dec.shape[0]} latents; the file is damaged, re-download it")
    return value


def _saelens_k(cfg: dict[str, Any], kind: str, cfg_path: Path) -> int:
    """``k`` at the top level, or in ``activation_fn_kwargs`` (SAELens 5.x)."""
    kwargs = _setting(cfg, "activation_fn_kwargs", mapping, cfg_path, default={})
    k = _setting(cfg, "k", _positive, cfg_path, default=None)
    k = k if k is not None else _setting(kwargs, "k", _positive, cfg_path, default=None)
    if k is None:
        raise DictionaryError(f"{cfg_path}: a {kind} SAE needs 'k' (or activation_fn_kwargs.k); the config is incomplete")
    return k


def _check_saelens_normalisation(cfg: dict[str, Any], folder: Path) -> None:
    """Only ``none`` is a fixed function of the weights; the others rescale each input at
    run time (or by a dataset statistic the folder does not carry)."""
    norm = cfg.get("normalize_activations")
    if norm in (None, False, "none"):
        return
    reasons = {
        "expected_average_only_in": "its scaling factor is a dataset statistic that is not stored with the weights",
        "constant_norm_rescale": "it rescales every token to a fixed norm at run time",
        "layer_norm": "it layer-normalises every token at run time",
    }
    key = "expected_average_only_in" if norm is True else norm  # SAELens < 6 wrote a bool
    why = reasons.get(key, "this version does not know it") if isinstance(key, str) else "this version does not know it"
    raise DictionaryError(
        f"{folder}: normalize_activations={printable(norm)} is unsupported ({why}); fold the scaling into the weights "
        "(SAELens: sae.fold_activation_norm_scaling_factor) and save with normalize_activations='none'"
    )


def _saelens_kind(cfg: dict[str, Any], cfg_path: Path, folder: Path) -> str:
    architecture = _setting(cfg, "architecture", text, cfg_path, default="standard")
    if architecture == "gated":
        raise DictionaryError(
            f"{folder}: SAELens architecture 'gated' is unsupported: a gated SAE has a separate gate "
            "(b_gate, r_mag, b_mag) that a plain encoder/decoder cannot express; use a standard, topk or jumprelu SAE"
        )
    if architecture == "standard":
        name = "activation_fn" if cfg.get("activation_fn") is not None else "activation_fn_str"
        activation = _setting(cfg, name, text, cfg_path, default="relu")
        if activation not in ("relu", "topk"):
            raise DictionaryError(f"{folder}: SAELens activation_fn {printable(activation)} is unsupported; supported: relu, topk")
        return activation
    if architecture in ("topk", "jumprelu", "batchtopk"):
        return architecture
    raise DictionaryError(f"{folder}: SAELens architecture {printable(architecture)} is unsupported; supported: standard, topk, jumprelu, batchtopk")


def _saelens_site(cfg: dict[str, Any], cfg_path: Path) -> Site:
    metadata = _setting(cfg, "metadata", mapping, cfg_path, default=None) or _setting(cfg, "meta", mapping, cfg_path, default={})
    if metadata.get("site") is not None:  # written by export_saelens
        try:
            return Site.from_dict(metadata["site"])
        except SiteError as err:
            raise DictionaryError(f"{cfg_path}: {err}; the config is damaged, re-download the dictionary") from err
    extra = {"source": "saelens"}
    for key in ("model_name", "hook_name"):
        value = _setting(metadata, key, text, cfg_path, default="") or _setting(cfg, key, text, cfg_path, default="")
        if value:
            extra[key] = value
    return Site(extra=extra)


# --- EleutherAI sparsify ---------------------------------------------------------------------


def load_sparsify(folder: Path) -> SparseAutoencoder:
    """An EleutherAI sparsify folder (one hookpoint)."""
    cfg_path = folder / "cfg.json"
    cfg = read_json(cfg_path)
    activation = _setting(cfg, "activation", text, cfg_path, default="topk")
    if activation != "topk":
        raise DictionaryError(f"{folder}: sparsify activation={printable(activation)} is unsupported; only topk is")
    for option in ("transcode", "skip_connection"):
        if _setting(cfg, option, flag, cfg_path, default=False):
            _refuse_sparsify_option(folder, option)
    k = _setting(cfg, "k", _positive, cfg_path)
    path = folder / "sae.safetensors"
    tensors = read_safetensors(path)
    if "W_skip" in tensors:
        _refuse_sparsify_option(folder, "skip_connection")
    weights = {
        "W_enc": _tensor(tensors, "encoder.weight", path, 2),
        "b_enc": _tensor(tensors, "encoder.bias", path, 1),
        "W_dec": _tensor(tensors, "W_dec", path, 2),
        "b_dec": _tensor(tensors, "b_dec", path, 1),
    }
    site = Site(extra={"source": "sparsify", "hookpoint": folder.name})
    sae = _sae(path, "topk", weights, k, subtract_decoder_bias=True, site=site)
    _check_declared_sizes(cfg, {"d_in": sae.d_in}, cfg_path)
    _check_declared_sizes(cfg, {"num_latents": sae.n_latents}, cfg_path, unset=(None, 0))  # 0: expansion_factor * d_in
    return _checked(sae, path)


def _refuse_sparsify_option(folder: Path, option: str) -> None:
    raise DictionaryError(
        f"{folder}: sparsify option {option}=true is unsupported (the output is not a reconstruction "
        "of the input alone); use a plain sparse autoencoder"
    )


# --- SDLens / sdxl-unbox ---------------------------------------------------------------------


def load_sdlens(folder: Path) -> SparseAutoencoder:
    """An SDLens / sdxl-unbox checkpoint folder."""
    cfg_path = folder / "config.json"
    cfg = read_json(cfg_path)
    k = _setting(cfg, "k", _positive, cfg_path)
    path = folder / "state_dict.pth"
    state = read_pickled_tensors(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise DictionaryError(f"{path} does not hold a state dict; re-save it with torch.save(sae.state_dict())")
    w_enc = _tensor(state, "encoder.weight", path, 2)
    b_enc = _tensor(state, "latent_bias", path, 1)
    if "encoder.bias" in state:  # encoder(x) includes its own bias when it has one
        encoder_bias = _tensor(state, "encoder.bias", path, 1)
        if encoder_bias.shape != b_enc.shape:
            raise DictionaryError(f"{path}: encoder.bias has shape {tuple(encoder_bias.shape)} but latent_bias {tuple(b_enc.shape)}; the file is damaged, re-download it")
        b_enc = b_enc + encoder_bias
    weights = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": _tensor(state, "decoder.weight", path, 2).T,
               "b_dec": _tensor(state, "pre_bias", path, 1)}
    n, d = w_enc.shape
    stats = {name: _sdlens_statistic(folder / f"{name}.pt", n, d) for name in ("mean", "std")}
    per_feature = {name: v for name, v in stats.items() if v is not None and v.numel() == n}
    per_input = {name: v for name, v in stats.items() if v is not None and v.numel() != n}
    standardizer = Standardizer(d, **per_input) if per_input else None
    if standardizer is not None:
        check_statistics(standardizer, d, str(folder))  # name the folder: the statistics come from mean.pt/std.pt
    sae = _sae(path, "topk", weights, k, subtract_decoder_bias=True, site=Site(extra={"source": "sdlens"}),
               standardizer=standardizer)
    _check_declared_sizes(cfg, {"n_dirs_local": n, "d_model": d}, cfg_path)
    if "mean" in per_feature:
        with torch.no_grad():
            sae.mean_activation.copy_(per_feature["mean"])
    return _checked(sae, path)


def _sdlens_statistic(path: Path, n: int, d: int) -> Tensor | None:
    """``mean.pt``/``std.pt`` as a float tensor ``(n,)`` or ``(d,)``, or None when absent."""
    if not path.exists():
        return None
    value = read_pickled_tensors(path)
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.shape not in ((n,), (d,)):
        held = type(value).__name__ if not isinstance(value, Tensor) else \
            f"{tuple(value.shape)}" if value.is_floating_point() else f"{value.dtype} values"
        raise DictionaryError(
            f"{path} holds {held}; expected a tensor of length {n} (per-feature statistics) "
            f"or {d} (input standardisation), of floats: remove or re-export it"
        )
    return value.detach().float()


# --- seed-A ITDA -----------------------------------------------------------------------------


def load_seed_itda(folder: Path) -> ITDA:
    """A seed-A (kisate/flux-saes-gpu) ITDA folder."""
    cfg_path = folder / "cfg.json"
    cfg = read_json(cfg_path)
    for option in ("skip_connection", "add_error"):
        if _setting(cfg, option, flag, cfg_path, default=False):
            raise DictionaryError(
                f"{folder}: ITDA option {option}=true is unsupported (its atoms are not plain activations "
                "that reconstruct the input); grow the dictionary without it"
            )
    size = _setting(cfg, "dictionary_size", _count, cfg_path)
    target_l0 = _setting(cfg, "target_l0", _positive, cfg_path)
    subtract_mean = _setting(cfg, "subtract_mean", flag, cfg_path, default=False)
    growth = _seed_itda_growth(cfg, cfg_path)
    path = folder / "sae.safetensors"
    tensors = read_safetensors(path)
    capacity = _tensor(tensors, "xs", path, 2)
    if size > capacity.shape[0]:
        raise DictionaryError(f"{path}: dictionary_size={size} but xs has {capacity.shape[0]} rows; the file is truncated, re-download it")
    xs = capacity[:size]  # rows past dictionary_size are uninitialised growth room
    d = xs.shape[1]
    mean = _input_vector(tensors, "mean_x", d, path) if subtract_mean else None
    std = _input_vector(tensors, "std_x", d, path) if "std_x" in tensors else None
    _check_seed_itda_is_autoencoder(tensors, xs, mean, folder)
    _check_declared_sizes(cfg, {"d_model": d}, cfg_path)
    itda = ITDA(d, target_l0, site=Site(extra={"source": "seed-itda"}),
                standardizer=Standardizer(d, mean=mean, std=std), n_atoms=size, **growth)
    itda.metadata["seed_itda_cfg"] = cfg  # provenance: the growth settings it was built with
    with torch.no_grad():
        itda.atoms.copy_(xs / xs.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return _checked(itda, path)


def _seed_itda_growth(cfg: dict[str, Any], cfg_path: Path) -> dict[str, float]:
    """``loss_threshold`` when it is a relative loss (``fvu_loss``), which must then lie in (0, 1];
    otherwise it is not comparable with ours and ITDA's default is kept."""
    threshold = _setting(cfg, "loss_threshold", lambda v, name: real_number(v, name, 0, math.inf), cfg_path, default=None)
    if threshold is None or not _setting(cfg, "fvu_loss", flag, cfg_path, default=False):
        return {}
    if not 0 < threshold <= 1:
        raise DictionaryError(f"{cfg_path}: loss_threshold={threshold:g} must be in (0, 1] for an fvu_loss dictionary; the config is damaged, re-download it")
    return {"loss_threshold": threshold}


def _input_vector(tensors: dict[str, Tensor], name: str, d: int, path: Path) -> Tensor:
    """A per-input-dimension tensor, exactly ``(d,)``."""
    value = _tensor(tensors, name, path, 1)
    if value.shape != (d,):
        raise DictionaryError(f"{path}: tensor '{name}' has shape {tuple(value.shape)} for inputs of width {d}; the file is damaged, re-download it")
    return value


def _check_seed_itda_is_autoencoder(tensors: dict[str, Tensor], xs: Tensor, mean_x: Tensor | None, folder: Path) -> None:
    """Seed A can decode into a different space (``ys``, ``mean_y``); we read autoencoders only."""
    for out_name, in_name, reference in (("ys", "xs", xs), ("mean_y", "mean_x", mean_x)):
        out = tensors.get(out_name)
        if reference is None or out is None:
            continue
        out = out.float()[: reference.shape[0]] if out.dim() == 2 else out.float()
        if out.shape != reference.shape or not torch.allclose(out, reference, rtol=1e-5, atol=1e-6, equal_nan=True):
            raise DictionaryError(
                f"{folder}: ITDA files whose {out_name} differ from {in_name} are unsupported "
                "(they decode into another space: a transcoder, not an autoencoder)"
            )


# --- export ----------------------------------------------------------------------------------


def export_saelens(dictionary: SparseAutoencoder, out_dir: str | os.PathLike) -> Path:
    """Write ``dictionary`` as a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``).

    SAELens has no input standardisation, so ``normalize(x) = (x - mu) / s`` and
    the decoder bias subtraction are folded into the weights (computed in float64)::

        W_enc' = (W_enc / s).T          b_enc' = b_enc - (W_enc / s) mu - W_enc b_dec·subtract
        W_dec' = W_dec * s              b_dec' = b_dec * s + mu

    with ``apply_b_dec_to_input=False``: SAELens then computes our codes and
    reconstructions from raw model activations. TopK exports as "topk", ReLU as
    "standard", JumpReLU and BatchTopK (its global threshold per latent) as
    "jumprelu". Returns the folder.
    """
    if not isinstance(dictionary, SparseAutoencoder):
        raise DictionaryError(
            f"{getattr(dictionary, 'kind', type(dictionary).__name__)} dictionaries are not representable in SAELens "
            "(it has no encoder matrix: codes come from a pursuit); export a sparse autoencoder, or share the native file"
        )
    out = Path(out_dir)
    check_finite(dictionary, out)
    architecture = _saelens_architecture(dictionary)
    tensors = _folded_saelens_weights(dictionary)
    if architecture == "jumprelu":
        tensors["threshold"] = dictionary.threshold.detach().float().cpu()
    cfg = _saelens_cfg(dictionary, architecture)
    save_safetensors_atomic(out / "sae_weights.safetensors", tensors, {})
    atomic_write(out / "cfg.json", lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2)))
    return out


def _saelens_architecture(sae: SparseAutoencoder) -> str:
    if sae.kind == "topk":
        return "topk"
    if sae.kind == "relu" and not bool(sae.threshold.any()):
        return "standard"
    return "jumprelu"  # jumprelu, batchtopk, and relu with a nonzero threshold


def _folded_saelens_weights(sae: SparseAutoencoder) -> dict[str, Tensor]:
    s = sae.standardizer.std.detach().double().cpu()
    mu = sae.standardizer.mean.detach().double().cpu()
    w_enc = sae.W_enc.detach().double().cpu()
    b_dec = sae.b_dec.detach().double().cpu()
    w_enc_n = w_enc / s
    b_enc = sae.b_enc.detach().double().cpu() - w_enc_n @ mu
    if sae.subtract_decoder_bias:
        b_enc = b_enc - w_enc @ b_dec
    return {
        "W_enc": w_enc_n.T.contiguous().float(),
        "b_enc": b_enc.float(),
        "W_dec": (sae.W_dec.detach().double().cpu() * s).float(),
        "b_dec": (b_dec * s + mu).float(),
    }


def _saelens_cfg(sae: SparseAutoencoder, architecture: str) -> dict[str, Any]:
    site = sae.site
    model_name, hook_name = site.family, f"{site.block}.{site.stream}"
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": sae.d_in,
        "d_sae": sae.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "model_name": model_name,
        "hook_name": hook_name,
        # Fields that SAELens 5.x requires to be present; they describe language-model
        # training runs, so they carry neutral values here.
        "activation_fn_str": "topk" if architecture == "topk" else "relu",
        "activation_fn_kwargs": {"k": sae.k} if architecture == "topk" else {},
        "finetuning_scaling_factor": False,
        "hook_layer": None,
        "hook_head_index": None,
        "context_size": None,
        "prepend_bos": False,
        "dataset_path": "",
        "dataset_trust_remote_code": False,
        "sae_lens_training_version": None,
        "metadata": {"model_name": model_name, "hook_name": hook_name, "site": site.to_dict(),
                     "exported_by": "diffusion-sae"},
    }
    if architecture == "topk":
        cfg["k"] = sae.k
        cfg["rescale_acts_by_decoder_norm"] = False
    return cfg
