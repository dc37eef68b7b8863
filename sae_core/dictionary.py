"""What every dictionary kind is: an ``encode``/``decode`` pair over decoder rows, plus where it lives.

A dictionary maps model-space activations ``(..., d_in)`` to sparse codes over ``n_latents`` decoder
rows and back. Kinds differ in how they encode (a learned encoder and a selection rule for SAEs,
gradient pursuit over real activations for ITDA) and in what their rows are; everything else —
the model-space round trip, dense codes, feature directions, the input checks — is the same and
lives here once.

**Non-finite inputs.** A token whose activations hold NaN or inf has no meaningful code. Selection
rules would hide that (a NaN pre-activation is never above a threshold, so a BatchTopK or JumpReLU
dictionary would "reconstruct" it as the decoder bias), so ``encode`` gives such a token NaN code
values, and ``decode`` therefore a NaN reconstruction, in exactly those rows; every other row is
encoded as if alone. NaN in, NaN out, as the model itself would propagate it, at no
synchronisation cost.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .checks import check_activations, check_codes, model_space_direction
from .kernels import SparseCodes, codes_to_dense
from .normalize import Standardizer
from .sites.site import Site


class Dictionary(nn.Module):
    """Base of :class:`~sae_core.sae.SparseAutoencoder` and :class:`~sae_core.itda.ITDA`.

    Subclasses set ``kind``, ``k``, ``site`` and ``standardizer`` and implement :attr:`rows` (the
    decoder rows in normalised space, ``(n_latents, d_in)``), :meth:`encode_rows` and :meth:`decode_normalized`.
    """

    kind: str
    k: int
    """Latents per token (TopK), or the target L0 (BatchTopK, ITDA)."""
    site: Site
    standardizer: Standardizer

    @property
    def rows(self) -> Tensor:
        raise NotImplementedError

    @property
    def d_in(self) -> int:
        return self.rows.shape[1]

    @property
    def n_latents(self) -> int:
        return self.rows.shape[0]

    def check_input(self, x: Tensor) -> None:
        check_activations(x, self.d_in, self.site)

    def encode(self, x: Tensor) -> SparseCodes:
        """Model-space activations ``(..., d_in)`` -> sparse codes ``(..., width)``; rows with NaN or inf
        get NaN values (see the module docstring)."""
        self.check_input(x)
        rows = x.reshape(-1, self.d_in)
        values, indices = self.encode_rows(rows)
        values = values.masked_fill(~torch.isfinite(rows).all(-1, keepdim=True), float("nan"))
        shape = (*x.shape[:-1], values.shape[-1])
        return SparseCodes(values.reshape(shape), indices.reshape(shape))

    def encode_rows(self, x: Tensor) -> SparseCodes:
        """Model-space activations ``(N, d_in)`` -> codes ``(N, width)``."""
        raise NotImplementedError

    def decode_normalized(self, codes: SparseCodes) -> Tensor:
        raise NotImplementedError

    def decode(self, codes: SparseCodes) -> Tensor:
        """Sparse codes -> model-space reconstruction."""
        check_codes(codes, self.n_latents)
        return self.standardizer.denormalize(self.decode_normalized(codes))

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x)).to(x.dtype)

    def dense_codes(self, x: Tensor) -> Tensor:
        """Codes as a dense ``(..., n_latents)`` matrix, for analysis and plotting."""
        return codes_to_dense(self.encode(x), self.n_latents)

    def direction(self, feature: int, unit: bool = False) -> Tensor:
        """Model-space change caused by one unit of ``feature``'s activation; ``unit=True`` returns it
        normalised to length 1 (for steering by norm)."""
        return model_space_direction(self.rows, feature, self.standardizer, unit)
