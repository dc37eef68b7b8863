"""What every dictionary kind is: an ``encode``/``decode`` pair over decoder rows, plus where it lives.

A dictionary maps model-space activations ``(..., d_in)`` to sparse codes over ``n_latents`` decoder
rows and back. Kinds differ in how they encode (a learned encoder and a selection rule for SAEs,
gradient pursuit over real activations for ITDA) and in what their rows are; everything else —
the model-space round trip, dense codes, feature directions, the width check — is the same and
lives here once.
"""
from __future__ import annotations

from torch import Tensor, nn

from .checks import check_width, model_space_direction
from .kernels import SparseCodes, codes_to_dense
from .normalize import Standardizer
from .sites.site import Site


class Dictionary(nn.Module):
    """Base of :class:`~sae_core.sae.SparseAutoencoder` and :class:`~sae_core.itda.ITDA`.

    Subclasses set ``kind``, ``k``, ``site`` and ``standardizer`` and implement :attr:`rows` (the
    decoder rows in normalised space, ``(n_latents, d_in)``), :meth:`encode` and :meth:`decode_normalized`.
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
        check_width(x, self.d_in, self.site)

    def encode(self, x: Tensor) -> SparseCodes:
        """Model-space activations ``(..., d_in)`` -> sparse codes ``(..., width)``."""
        raise NotImplementedError

    def decode_normalized(self, codes: SparseCodes) -> Tensor:
        raise NotImplementedError

    def decode(self, codes: SparseCodes) -> Tensor:
        """Sparse codes -> model-space reconstruction."""
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
