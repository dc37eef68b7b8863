"""Sparse autoencoders: an ``encode``/``decode`` pair over a learned dictionary.

One module covers every SAE this project reads or trains. They differ only in
how latents are selected from the pre-activations ``W_enc (x_n - b_dec) + b_enc``:

* ``topk``: the k largest per token (Gao et al. 2024);
* ``batchtopk``: the ``N*k`` largest per batch while training, then a learned
  global threshold at inference (Bussmann et al. 2024);
* ``matryoshka_batchtopk``: selects as ``batchtopk`` does, but its latents are
  ordered: ``prefixes`` are nested sizes ``m_1 < ... < m_L = n_latents``, and
  training minimises the mean over prefixes of the loss of reconstructing from
  latents ``0..m_i-1`` alone (plus ``b_dec``), so that the first latents learn
  the general features and later ones refine them (Bussmann et al. 2025,
  "Learning Multi-Level Features with Matryoshka Sparse Autoencoders"). The
  prefixes are a training matter: encode and decode are ``batchtopk``'s, and
  the header records them so a reader knows which latents form each level;
* ``relu`` / ``jumprelu``: everything above 0 / above a per-latent threshold
  (read from SAELens files).

``x_n`` is the normalised input (see :mod:`sae_core.normalize`); ``encode``
takes and ``decode`` returns model-space activations.
"""
from __future__ import annotations

from numbers import Integral
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .checks import flag, mapping, printable, required, whole_number
from .dictionary import Dictionary
from .errors import ConfigError, DictionaryError
from .kernels import SparseCodes, sparse_decode, threshold_codes
from .normalize import Standardizer
from .sites.site import Site

MATRYOSHKA = "matryoshka_batchtopk"
SAE_KINDS = ("topk", "batchtopk", MATRYOSHKA, "relu", "jumprelu")
BATCH_TOPK_KINDS = ("batchtopk", MATRYOSHKA)
"""Kinds that train on the batch's ``N*k`` largest activations and encode by a learned threshold."""
COUNTED_KINDS = ("topk", *BATCH_TOPK_KINDS)
"""Kinds whose ``k`` is a count of selected latents (relu/jumprelu select by threshold; their k is a label)."""


def prefix_problem(prefixes: Sequence[int], n_latents: int) -> str | None:
    """Why ``prefixes`` cannot be the nested sizes of a Matryoshka dictionary of ``n_latents``, or None."""
    if len(prefixes) < 2:
        return "must give at least two nested sizes (one is a plain batchtopk)"
    if prefixes[0] < 1 or any(b <= a for a, b in zip(prefixes, prefixes[1:])):
        return "must increase strictly from at least 1"
    if prefixes[-1] != n_latents:
        return f"must end at n_latents={n_latents}"
    return None


class SparseAutoencoder(Dictionary):
    kind: str
    prefixes: tuple[int, ...]
    """The nested sizes whose reconstructions training averages: a Matryoshka dictionary's levels, else
    ``(n_latents,)``."""

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        k: int,
        kind: str = "topk",
        *,
        site: Site | None = None,
        standardizer: Standardizer | None = None,
        subtract_decoder_bias: bool = True,
        seed: int | None = 0,
        prefixes: Sequence[int] | None = None,
    ):
        """``prefixes``: the nested sizes of a ``matryoshka_batchtopk`` dictionary (required for it, refused
        for the other kinds, which train as one prefix, all of their latents)."""
        super().__init__()
        if kind not in SAE_KINDS:
            raise ConfigError(f"unknown SAE kind {kind!r}; expected one of {', '.join(SAE_KINDS)}")
        if kind in COUNTED_KINDS and not 0 < k <= n_latents:
            raise ConfigError(f"k={k} must be between 1 and n_latents={n_latents}; lower k or widen the dictionary")
        self.kind = kind
        self.k = int(k)
        self.prefixes = _checked_prefixes(kind, prefixes, n_latents)
        self.site = site or Site()
        self.subtract_decoder_bias = subtract_decoder_bias
        self.standardizer = standardizer or Standardizer(d_in)
        self.metadata: dict[str, Any] = {}

        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        w_dec = torch.randn(n_latents, d_in, generator=gen)
        w_dec /= w_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.clone())  # tied initialisation
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("threshold", torch.zeros(n_latents))
        self.register_buffer("firing_frequency", torch.zeros(n_latents))
        self.register_buffer("mean_activation", torch.zeros(n_latents))

    @property
    def rows(self) -> Tensor:
        return self.W_dec

    def pre_activations(self, x_n: Tensor) -> Tensor:
        """Dense pre-activations ``(..., M)`` of normalised input ``x_n``."""
        if self.subtract_decoder_bias:
            x_n = x_n - self.b_dec.to(x_n.dtype)
        return x_n @ self.W_enc.to(x_n.dtype).T + self.b_enc.to(x_n.dtype)

    def encode_rows(self, x: Tensor) -> SparseCodes:
        """Model-space activations ``(N, d_in)`` -> the kind's selection of pre-activations."""
        pre = self.pre_activations(self.standardizer.normalize(x.to(self.W_enc.dtype)))
        if self.kind == "topk":
            values, indices = pre.topk(self.k, dim=-1, sorted=False)
            return SparseCodes(values.clamp_min(0.0), indices)
        return threshold_codes(pre, self.threshold)

    def decode_normalized(self, codes: SparseCodes) -> Tensor:
        return sparse_decode(codes, self.W_dec) + self.b_dec

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale decoder rows to unit norm (the constraint Gao et al. train under)."""
        norms = self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.W_dec.div_(norms)

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Project out the gradient component along each decoder row, so that
        Adam's step moves rows over the unit sphere instead of growing them."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)

    def config(self) -> dict[str, Any]:
        """Everything besides the tensors needed to rebuild this module (JSON-able)."""
        return {
            "kind": self.kind,
            "d_in": self.d_in,
            "n_latents": self.n_latents,
            "k": self.k,
            "subtract_decoder_bias": self.subtract_decoder_bias,
            "site": self.site.to_dict(),
            "metadata": self.metadata,
            **({"prefixes": list(self.prefixes)} if self.kind == MATRYOSHKA else {}),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "SparseAutoencoder":
        """An untrained module with the shapes ``config`` describes (load a state dict into it).

        Every field :meth:`config` writes is required with its exact JSON type: a header is read as
        written or refused (DictionaryError, or SiteError for the site), never coerced or defaulted."""
        kind = required(config, "kind")
        if kind not in SAE_KINDS:
            raise DictionaryError(f"kind={printable(kind)} is not one of {', '.join(SAE_KINDS)}")
        d_in = whole_number(required(config, "d_in"), "d_in", 1)
        n_latents = whole_number(required(config, "n_latents"), "n_latents", 1)
        lowest_k = 1 if kind in COUNTED_KINDS else 0
        k = whole_number(required(config, "k"), "k", lowest_k, n_latents, f"n_latents={n_latents}")
        prefixes = _header_prefixes(required(config, "prefixes"), n_latents) if kind == MATRYOSHKA else None
        sae = cls(d_in, n_latents, k, kind, site=Site.from_dict(required(config, "site")),
                  subtract_decoder_bias=flag(required(config, "subtract_decoder_bias"), "subtract_decoder_bias"),
                  seed=None, prefixes=prefixes)
        sae.metadata = dict(mapping(required(config, "metadata"), "metadata"))
        return sae

    def extra_repr(self) -> str:
        nested = f", prefixes={list(self.prefixes)}" if self.kind == MATRYOSHKA else ""
        return f"kind={self.kind}, d_in={self.d_in}, n_latents={self.n_latents}, k={self.k}{nested}, site={self.site}"


def _checked_prefixes(kind: str, prefixes: Sequence[int] | None, n_latents: int) -> tuple[int, ...]:
    """The prefixes a module of ``kind`` trains with: ``prefixes`` for a Matryoshka one, else all latents."""
    if kind != MATRYOSHKA:
        if prefixes is not None:
            raise ConfigError(f"prefixes apply to kind {MATRYOSHKA} only; drop them for kind {kind!r}")
        return (n_latents,)
    if prefixes is None:
        raise ConfigError(f"kind {MATRYOSHKA} needs prefixes, its nested sizes ending at n_latents={n_latents}")
    whole = isinstance(prefixes, (list, tuple)) and all(isinstance(m, Integral) and not isinstance(m, bool) for m in prefixes)
    if not whole:
        raise ConfigError(f"prefixes={printable(prefixes)} must be a list of whole numbers such as "
                          f"[{n_latents // 2}, {n_latents}]")
    sizes = tuple(int(m) for m in prefixes)
    problem = prefix_problem(sizes, n_latents)
    if problem:
        raise ConfigError(f"prefixes={printable(list(sizes))} {problem}")
    return sizes


def _header_prefixes(value: Any, n_latents: int) -> list[int]:
    """A header's ``prefixes``: a JSON list of whole numbers, nested as :func:`prefix_problem` requires."""
    if not isinstance(value, list):
        raise DictionaryError(f"prefixes={printable(value)} is not a list of whole numbers")
    sizes = [whole_number(m, f"prefixes[{i}]", 1, n_latents, f"n_latents={n_latents}") for i, m in enumerate(value)]
    problem = prefix_problem(sizes, n_latents)
    if problem:
        raise DictionaryError(f"prefixes={printable(value)} {problem}")
    return sizes
