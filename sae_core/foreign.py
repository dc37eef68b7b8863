"""Other projects' dictionary layouts, read into our modules; export to SAELens.

Each ``load_*`` reader takes a local folder and returns a module that computes
exactly the formula the other project publishes, written in our terms
(``pre = W_enc (x - b_dec·subtract) + b_enc``, then the kind's selection,
``x_hat = f W_dec + b_dec``; see :mod:`sae_core.sae`). Weights are converted to
float32; a file with NaN/inf weights is refused, naming the tensor.

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
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from .atomic import atomic_write, save_safetensors_atomic
from .errors import DictionaryError
from .fileformat import Dictionary, check_finite
from .itda import ITDA
from .normalize import Standardizer
from .sae import SparseAutoencoder
from .sites.site import Site

SAELENS_FILES = ("cfg.json", "sae_weights.safetensors")
SPARSIFY_FILES = ("cfg.json", "sae.safetensors")  # seed-A ITDA uses the same two names
SDLENS_FILES = ("config.json", "state_dict.pth")
SEED_ITDA_KEYS = ("target_l0", "dictionary_size")
"""cfg.json keys that only seed-A ITDA writes: they tell it apart from sparsify."""


# --- reading files ---------------------------------------------------------------------------


def short_reason(err: BaseException) -> str:
    """The first sentence of an exception's message, for one-line DictionaryErrors."""
    lines = str(err).strip().splitlines() or [type(err).__name__]
    return lines[0].split(". ")[0][:200]


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
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
    exception, so the message covers both."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise DictionaryError(
            f"{path} holds pickled Python objects besides tensors (or is damaged); refusing to unpickle arbitrary "
            "objects, which can run code: re-save it as tensors (torch.save(sae.state_dict())) or as safetensors"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise DictionaryError(f"{path} is truncated or not a PyTorch tensor file ({short_reason(err)}); re-download it") from err


def _tensor(tensors: dict[str, Any], name: str, path: Path) -> Tensor:
    value = tensors.get(name)
    if not isinstance(value, Tensor):
        found = ", ".join(sorted(str(k) for k in tensors)) or "none"
        raise DictionaryError(f"{path} has no tensor '{name}' (found: {found}); it is not in the expected layout")
    return value.detach().float()


def _flag(cfg: dict[str, Any], name: str) -> bool:
    return bool(cfg.get(name))


def _required(cfg: dict[str, Any], name: str, path: Path) -> Any:
    if cfg.get(name) is None:
        raise DictionaryError(f"{path} has no '{name}' setting; the config is incomplete, re-download the dictionary")
    return cfg[name]


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
    """Our module around foreign weights in our orientation: ``W_enc``, ``W_dec`` both ``(n, d)``."""
    w_enc, b_enc, w_dec, b_dec = (weights[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec"))
    n, d = w_dec.shape
    if w_enc.shape != (n, d) or b_enc.shape != (n,) or b_dec.shape != (d,):
        raise DictionaryError(
            f"{path}: inconsistent shapes (encoder {tuple(w_enc.shape)}, decoder {tuple(w_dec.shape)}, "
            f"encoder bias {tuple(b_enc.shape)}, decoder bias {tuple(b_dec.shape)}); the file is damaged, re-download it"
        )
    if kind in ("topk", "batchtopk") and not 0 < k <= n:
        raise DictionaryError(f"{path}: k={k} must be between 1 and the {n} latents; the config does not match the weights")
    if "threshold" in weights:  # per latent, or one global value (BatchTopK)
        threshold = weights["threshold"].reshape(-1)
        if threshold.numel() not in (1, n):
            raise DictionaryError(f"{path}: threshold has {threshold.numel()} values for {n} latents; the file is damaged, re-download it")
        weights = {**weights, "threshold": threshold.expand(n)}
    sae = SparseAutoencoder(d, n, max(k, 1), kind, site=site, standardizer=standardizer,
                            subtract_decoder_bias=subtract_decoder_bias, seed=None)
    with torch.no_grad():
        for name, value in weights.items():
            getattr(sae, name).copy_(value)
    return sae


def _checked(dictionary: Dictionary, path: Path) -> Dictionary:
    check_finite(dictionary, path)
    return dictionary


# --- SAELens ---------------------------------------------------------------------------------


def load_saelens(folder: Path) -> SparseAutoencoder:
    """A SAELens folder (see the module docstring for the formula)."""
    cfg = read_json(folder / "cfg.json")
    _check_saelens_normalisation(cfg, folder)
    kind = _saelens_kind(cfg, folder)
    path = folder / "sae_weights.safetensors"
    tensors = read_safetensors(path)
    weights = {
        "W_enc": _tensor(tensors, "W_enc", path).T,
        "b_enc": _tensor(tensors, "b_enc", path),
        "W_dec": _tensor(tensors, "W_dec", path),
        "b_dec": _tensor(tensors, "b_dec", path),
    }
    if kind == "jumprelu":
        weights["threshold"] = _tensor(tensors, "threshold", path)
    if kind == "batchtopk":
        weights["threshold"] = _tensor(tensors, "topk_threshold" if "topk_threshold" in tensors else "threshold", path)
    if _flag(cfg, "finetuning_scaling_factor"):
        weights["W_dec"] = weights["W_dec"] * _tensor(tensors, "finetuning_scaling_factor", path)[:, None]
    if _flag(cfg, "rescale_acts_by_decoder_norm"):
        norms = weights["W_dec"].norm(dim=-1)
        weights.update(W_enc=weights["W_enc"] * norms[:, None], b_enc=weights["b_enc"] * norms,
                       W_dec=weights["W_dec"] / norms.clamp_min(1e-12)[:, None])
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if kind in ("topk", "batchtopk") and not k:
        raise DictionaryError(f"{folder / 'cfg.json'}: a {kind} SAE needs 'k' (or activation_fn_kwargs.k); the config is incomplete")
    sae = _sae(path, kind, weights, round(float(k or 0)), site=_saelens_site(cfg),
               subtract_decoder_bias=bool(cfg.get("apply_b_dec_to_input", True)))
    return _checked(sae, path)


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
    key = "expected_average_only_in" if norm is True else str(norm)  # SAELens < 6 wrote a bool
    why = reasons.get(key, "this version does not know it")
    raise DictionaryError(
        f"{folder}: normalize_activations={norm!r} is unsupported ({why}); fold the scaling into the weights "
        "(SAELens: sae.fold_activation_norm_scaling_factor) and save with normalize_activations='none'"
    )


def _saelens_kind(cfg: dict[str, Any], folder: Path) -> str:
    architecture = cfg.get("architecture") or "standard"
    if architecture == "gated":
        raise DictionaryError(
            f"{folder}: SAELens architecture 'gated' is unsupported: a gated SAE has a separate gate "
            "(b_gate, r_mag, b_mag) that a plain encoder/decoder cannot express; use a standard, topk or jumprelu SAE"
        )
    if architecture == "standard":
        activation = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
        if activation not in ("relu", "topk"):
            raise DictionaryError(f"{folder}: SAELens activation_fn {activation!r} is unsupported; supported: relu, topk")
        return str(activation)
    if architecture in ("topk", "jumprelu", "batchtopk"):
        return str(architecture)
    raise DictionaryError(f"{folder}: SAELens architecture {architecture!r} is unsupported; supported: standard, topk, jumprelu, batchtopk")


def _saelens_site(cfg: dict[str, Any]) -> Site:
    metadata = cfg.get("metadata") or cfg.get("meta")
    metadata = metadata if isinstance(metadata, dict) else {}
    if isinstance(metadata.get("site"), dict):  # written by export_saelens
        return Site.from_dict(metadata["site"])
    extra = {"source": "saelens"}
    for key in ("model_name", "hook_name"):
        value = metadata.get(key) or cfg.get(key)
        if value:
            extra[key] = str(value)
    return Site(extra=extra)


# --- EleutherAI sparsify ---------------------------------------------------------------------


def load_sparsify(folder: Path) -> SparseAutoencoder:
    """An EleutherAI sparsify folder (one hookpoint)."""
    cfg = read_json(folder / "cfg.json")
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise DictionaryError(f"{folder}: sparsify activation={activation!r} is unsupported; only topk is")
    for option in ("transcode", "skip_connection"):
        if _flag(cfg, option):
            _refuse_sparsify_option(folder, option)
    path = folder / "sae.safetensors"
    tensors = read_safetensors(path)
    if "W_skip" in tensors:
        _refuse_sparsify_option(folder, "skip_connection")
    weights = {
        "W_enc": _tensor(tensors, "encoder.weight", path),
        "b_enc": _tensor(tensors, "encoder.bias", path),
        "W_dec": _tensor(tensors, "W_dec", path),
        "b_dec": _tensor(tensors, "b_dec", path),
    }
    site = Site(extra={"source": "sparsify", "hookpoint": folder.name})
    k = int(_required(cfg, "k", folder / "cfg.json"))
    return _checked(_sae(path, "topk", weights, k, subtract_decoder_bias=True, site=site), path)


def _refuse_sparsify_option(folder: Path, option: str) -> None:
    raise DictionaryError(
        f"{folder}: sparsify option {option}=true is unsupported (the output is not a reconstruction "
        "of the input alone); use a plain sparse autoencoder"
    )


# --- SDLens / sdxl-unbox ---------------------------------------------------------------------


def load_sdlens(folder: Path) -> SparseAutoencoder:
    """An SDLens / sdxl-unbox checkpoint folder."""
    cfg = read_json(folder / "config.json")
    path = folder / "state_dict.pth"
    state = read_pickled_tensors(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise DictionaryError(f"{path} does not hold a state dict; re-save it with torch.save(sae.state_dict())")
    w_enc = _tensor(state, "encoder.weight", path)
    b_enc = _tensor(state, "latent_bias", path)
    if isinstance(state.get("encoder.bias"), Tensor):  # encoder(x) includes its own bias when it has one
        b_enc = b_enc + state["encoder.bias"].float()
    weights = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": _tensor(state, "decoder.weight", path).T,
               "b_dec": _tensor(state, "pre_bias", path)}
    n, d = w_enc.shape
    stats = {name: _sdlens_statistic(folder / f"{name}.pt", n, d) for name in ("mean", "std")}
    per_feature = {name: v for name, v in stats.items() if v is not None and v.numel() == n}
    per_input = {name: v for name, v in stats.items() if v is not None and v.numel() != n}
    if "std" in per_input and not bool((per_input["std"] > 0).all()):
        raise DictionaryError(f"{folder / 'std.pt'} has zero or negative entries; it cannot standardise the input, re-export it")
    standardizer = Standardizer(d, **per_input) if per_input else None
    k = int(_required(cfg, "k", folder / "config.json"))
    sae = _sae(path, "topk", weights, k, subtract_decoder_bias=True, site=Site(extra={"source": "sdlens"}),
               standardizer=standardizer)
    if "mean" in per_feature:
        with torch.no_grad():
            sae.mean_activation.copy_(per_feature["mean"])
    return _checked(sae, path)


def _sdlens_statistic(path: Path, n: int, d: int) -> Tensor | None:
    """``mean.pt``/``std.pt`` as a flat float tensor of length n or d, or None when absent."""
    if not path.exists():
        return None
    value = read_pickled_tensors(path)
    if not isinstance(value, Tensor) or value.numel() not in (n, d):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise DictionaryError(
            f"{path} holds {shape}; expected a tensor of length {n} (per-feature statistics) "
            f"or {d} (input standardisation): remove or re-export it"
        )
    return value.detach().float().reshape(-1)


# --- seed-A ITDA -----------------------------------------------------------------------------


def load_seed_itda(folder: Path) -> ITDA:
    """A seed-A (kisate/flux-saes-gpu) ITDA folder."""
    cfg = read_json(folder / "cfg.json")
    for option in ("skip_connection", "add_error"):
        if _flag(cfg, option):
            raise DictionaryError(
                f"{folder}: ITDA option {option}=true is unsupported (its atoms are not plain activations "
                "that reconstruct the input); grow the dictionary without it"
            )
    path = folder / "sae.safetensors"
    tensors = read_safetensors(path)
    size = int(_required(cfg, "dictionary_size", folder / "cfg.json"))
    capacity = _tensor(tensors, "xs", path)
    if not 0 <= size <= capacity.shape[0]:
        raise DictionaryError(f"{path}: dictionary_size={size} but xs has {capacity.shape[0]} rows; the file is truncated, re-download it")
    xs = capacity[:size]  # rows past dictionary_size are uninitialised growth room
    _check_seed_itda_is_autoencoder(cfg, tensors, xs, folder, path)
    d = xs.shape[1]
    mean = _tensor(tensors, "mean_x", path) if _flag(cfg, "subtract_mean") else None
    std = _tensor(tensors, "std_x", path) if "std_x" in tensors else None
    growth: dict[str, float] = {}
    threshold = float(cfg.get("loss_threshold") or 0)
    if _flag(cfg, "fvu_loss") and 0 < threshold <= 1:  # else not comparable with our relative loss: keep ITDA's default
        growth["loss_threshold"] = threshold
    itda = ITDA(d, int(_required(cfg, "target_l0", folder / "cfg.json")), site=Site(extra={"source": "seed-itda"}),
                standardizer=Standardizer(d, mean=mean, std=std), n_atoms=size, **growth)
    itda.metadata["seed_itda_cfg"] = cfg  # provenance: the growth settings it was built with
    with torch.no_grad():
        itda.atoms.copy_(xs / xs.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return _checked(itda, path)


def _check_seed_itda_is_autoencoder(cfg: dict[str, Any], tensors: dict[str, Tensor], xs: Tensor,
                                    folder: Path, path: Path) -> None:
    """Seed A can decode into a different space (``ys``, ``mean_y``); we read autoencoders only."""
    pairs = [("ys", "xs", xs)]
    if _flag(cfg, "subtract_mean"):
        pairs.append(("mean_y", "mean_x", _tensor(tensors, "mean_x", path)))
    for out_name, in_name, reference in pairs:
        out = tensors.get(out_name)
        if out is None:
            continue
        out = out.float()[: reference.shape[0]] if out.dim() == 2 else out.float()
        if out.shape != reference.shape or not torch.allclose(out, reference, rtol=1e-5, atol=1e-6):
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
