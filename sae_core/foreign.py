"""Other projects' dictionary layouts, read into our modules, and SAELens export.

Each reader takes a local folder and returns a module computing exactly the
formula that project publishes:

* **SAELens** (``cfg.json`` + ``sae_weights.safetensors``): ``W_enc [d_in, d_sae]``;
  ``f = act(W_enc^T (x - b_dec·apply_b_dec_to_input) + b_enc)`` with act = ReLU
  ("standard"), TopK ("topk"), or a per-latent threshold ("jumprelu");
  ``x_hat = W_dec^T f + b_dec``.
* **EleutherAI sparsify** (``cfg.json`` + ``sae.safetensors``): ``encoder.weight (n, d)``,
  ``encoder.bias``, ``W_dec (n, d)``, ``b_dec``; ``f = topk(relu(encoder(x - b_dec)))``.
* **SDLens / sdxl-unbox** (``config.json`` + ``state_dict.pth`` [+ ``mean.pt``, ``std.pt``]):
  ``f = relu(topk(encoder(x - pre_bias) + latent_bias))``, ``x_hat = decoder(f) + pre_bias``
  with ``decoder.weight (d, n)``. ``mean.pt``/``std.pt`` of length n are per-feature
  activation statistics (used to scale steering); of length d, input standardisation.
* **Seed-A ITDA** (``cfg.json`` + ``sae.safetensors``): atoms ``xs`` (capacity rows, the
  first ``dictionary_size`` valid), ``mean_x`` subtracted when ``subtract_mean``.

Pickled files are read only with ``torch.load(weights_only=True)``.
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
from .itda import ITDA
from .normalize import Standardizer
from .sae import SparseAutoencoder
from .site import Site


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DictionaryError(f"{path}: cannot read this JSON config ({err}); re-download the dictionary") from err


def read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise DictionaryError(f"{path} is truncated or not a valid safetensors file ({err}); re-download or re-save it") from err


def read_pickled_tensors(path: Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers: never arbitrary objects."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise DictionaryError(
            f"{path} holds pickled Python objects besides tensors; refusing to unpickle arbitrary objects "
            "(it could run code): re-save it as a plain state dict or as safetensors"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise DictionaryError(f"{path} is truncated or not a PyTorch tensor file ({err}); re-download it") from err


def _tensor(tensors: dict[str, Tensor], name: str, path: Path) -> Tensor:
    if name not in tensors:
        raise DictionaryError(f"{path} has no tensor '{name}' (found: {', '.join(sorted(tensors)) or 'none'}); it is not in the expected layout")
    return tensors[name].float()


def _sae(kind: str, w_enc: Tensor, b_enc: Tensor, w_dec: Tensor, b_dec: Tensor, k: int, *,
         subtract_decoder_bias: bool, site: Site, standardizer: Standardizer | None = None) -> SparseAutoencoder:
    n, d = w_dec.shape
    if w_enc.shape != (n, d) or b_enc.shape != (n,) or b_dec.shape != (d,):
        raise DictionaryError(f"inconsistent shapes: encoder {tuple(w_enc.shape)}, decoder {tuple(w_dec.shape)}, biases {tuple(b_enc.shape)}/{tuple(b_dec.shape)}")
    sae = SparseAutoencoder(d, n, k if kind in ("topk", "batchtopk") else max(k, 1), kind, site=site,
                            standardizer=standardizer, subtract_decoder_bias=subtract_decoder_bias, seed=None)
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(w_dec)
        sae.b_dec.copy_(b_dec)
    return sae


def load_saelens(folder: Path) -> SparseAutoencoder:
    cfg = read_json(folder / "cfg.json")
    tensors = read_safetensors(folder / "sae_weights.safetensors")
    architecture = cfg.get("architecture", "standard")
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise DictionaryError(
            f"{folder}: normalize_activations={norm!r} is unsupported (its scaling factor is not stored with "
            "the weights); fold the scaling into the weights or export it with normalize_activations='none'"
        )
    kinds = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
    if architecture not in kinds:
        raise DictionaryError(f"{folder}: SAELens architecture {architecture!r} is unsupported; supported: {', '.join(kinds)}")
    k = int(cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k") or 0)
    metadata = cfg.get("metadata") or {}
    site = Site(family=str(metadata.get("model_name") or cfg.get("model_name") or "unknown"),
                block=str(metadata.get("hook_name") or cfg.get("hook_name") or "unknown"),
                extra={"source": "saelens"})
    sae = _sae(kinds[architecture], _tensor(tensors, "W_enc", folder).T, _tensor(tensors, "b_enc", folder),
               _tensor(tensors, "W_dec", folder), _tensor(tensors, "b_dec", folder), k,
               subtract_decoder_bias=bool(cfg.get("apply_b_dec_to_input", False)), site=site)
    if kinds[architecture] == "jumprelu":
        with torch.no_grad():
            sae.threshold.copy_(_tensor(tensors, "threshold", folder).expand(sae.n_latents))
    return sae


def load_sparsify(folder: Path) -> SparseAutoencoder:
    cfg = read_json(folder / "cfg.json")
    for option in ("skip_connection", "transcode"):
        if cfg.get(option):
            raise DictionaryError(f"{folder}: sparsify option {option}=true is unsupported (the dictionary is not an autoencoder of one site)")
    tensors = read_safetensors(folder / "sae.safetensors")
    w_enc = _tensor(tensors, "encoder.weight", folder)
    site = Site(extra={"source": "sparsify"})
    return _sae("topk", w_enc, _tensor(tensors, "encoder.bias", folder), _tensor(tensors, "W_dec", folder),
                _tensor(tensors, "b_dec", folder), int(cfg["k"]), subtract_decoder_bias=True, site=site)


def load_sdlens(folder: Path) -> SparseAutoencoder:
    cfg = read_json(folder / "config.json")
    state = read_pickled_tensors(folder / "state_dict.pth")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise DictionaryError(f"{folder / 'state_dict.pth'} does not hold a state dict; re-save it with torch.save(model.state_dict())")
    path = folder / "state_dict.pth"
    w_enc = _tensor(state, "encoder.weight", path)
    n, d = w_enc.shape
    standardizer = None
    stats: dict[str, Tensor] = {}
    for name in ("mean", "std"):
        file = folder / f"{name}.pt"
        if file.exists():
            value = read_pickled_tensors(file)
            if not isinstance(value, Tensor):
                raise DictionaryError(f"{file} does not hold a tensor")
            stats[name] = value.float().flatten()
    if any(v.numel() == d and v.numel() != n for v in stats.values()):
        standardizer = Standardizer(d, mean=stats.get("mean"), std=stats.get("std"))
    sae = _sae("topk", w_enc, _tensor(state, "latent_bias", path), _tensor(state, "decoder.weight", path).T,
               _tensor(state, "pre_bias", path), int(cfg["k"]), subtract_decoder_bias=True,
               site=Site(extra={"source": "sdlens"}), standardizer=standardizer)
    if "mean" in stats and stats["mean"].numel() == n and standardizer is None:
        with torch.no_grad():
            sae.mean_activation.copy_(stats["mean"])
    return sae


def load_seed_itda(folder: Path) -> ITDA:
    cfg = read_json(folder / "cfg.json")
    for option in ("skip_connection", "add_error"):
        if cfg.get(option):
            raise DictionaryError(f"{folder}: ITDA option {option}=true is unsupported (atoms would not be plain activations)")
    tensors = read_safetensors(folder / "sae.safetensors")
    size = int(cfg["dictionary_size"])
    xs = _tensor(tensors, "xs", folder)[:size]
    if "ys" in tensors and not torch.allclose(tensors["ys"].float()[:size], xs, atol=1e-5):
        raise DictionaryError(f"{folder}: ITDA files whose decoder atoms (ys) differ from the encoder atoms (xs) are unsupported")
    d = xs.shape[1]
    mean = tensors["mean_x"].float() if cfg.get("subtract_mean") and "mean_x" in tensors else None
    std = tensors["std_x"].float() if "std_x" in tensors else None
    itda = ITDA(d, int(cfg["target_l0"]), loss_threshold=min(float(cfg.get("loss_threshold", 0.3)), 1.0),
                site=Site(extra={"source": "seed-itda"}), standardizer=Standardizer(d, mean=mean, std=std), n_atoms=size)
    with torch.no_grad():
        itda.atoms.copy_(xs / xs.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return itda


def export_saelens(dictionary: SparseAutoencoder, out_dir: str | os.PathLike) -> Path:
    """Write ``dictionary`` in SAELens' layout, normalisation folded into the weights so
    SAELens computes the same function on raw model activations."""
    if not isinstance(dictionary, SparseAutoencoder):
        raise DictionaryError("only sparse autoencoders can be exported to SAELens; ITDA has no encoder matrix")
    out = Path(out_dir)
    s, mu = dictionary.standardizer.std.double(), dictionary.standardizer.mean.double()
    w_enc = dictionary.W_enc.detach().double() / s
    b_enc = dictionary.b_enc.detach().double() - w_enc @ mu
    if dictionary.subtract_decoder_bias:
        b_enc = b_enc - dictionary.W_enc.detach().double() @ dictionary.b_dec.detach().double()
    tensors = {
        "W_enc": w_enc.T.float(),
        "b_enc": b_enc.float(),
        "W_dec": (dictionary.W_dec.detach().double() * s).float(),
        "b_dec": (dictionary.b_dec.detach().double() * s + mu).float(),
    }
    architecture = {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}[dictionary.kind]
    if architecture == "jumprelu":
        tensors["threshold"] = dictionary.threshold.detach().float()
    site = dictionary.site
    cfg = {
        "architecture": architecture,
        "d_in": dictionary.d_in,
        "d_sae": dictionary.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "model_name": site.family,
        "hook_name": f"{site.block}.{site.stream}",
        "metadata": {"model_name": site.family, "hook_name": f"{site.block}.{site.stream}", "site": site.to_dict(),
                     "exported_by": "diffusion-sae"},
    }
    if architecture == "topk":
        cfg["k"] = dictionary.k
        cfg["activation_fn_kwargs"] = {"k": dictionary.k}
    save_safetensors_atomic(out / "sae_weights.safetensors", tensors, {})
    atomic_write(out / "cfg.json", lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2)))
    return out
