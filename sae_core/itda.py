"""ITDA: Inference-Time Decomposition of Activations (Leask et al. 2025).

An ITDA dictionary is not learned by gradient descent: its atoms are *real*
activation vectors, each remembered with where it came from (sample id, token
position, timestep). An input is explained by a few atoms found with gradient
pursuit, and the dictionary grows online: an input that the current atoms
reconstruct worse than ``loss_threshold`` becomes an atom itself. Because each
atom is an actual activation, every feature has a concrete example by
construction, which is what makes ITDA features easy to inspect.

Atoms are stored unit-norm in normalised space (see :mod:`sae_core.normalize`);
``encode`` takes and ``decode`` returns model-space activations, like the SAE.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .checks import check_width, model_space_direction
from .errors import DictionaryError
from .kernels import SparseCodes, codes_to_dense, sparse_decode
from .normalize import Standardizer
from .site import Site

PROVENANCE = {"sample_id": (torch.int64, -1), "token": (torch.int64, -1), "timestep": (torch.float32, -1.0)}


def gradient_pursuit(x: Tensor, atoms: Tensor, l0: int) -> SparseCodes:
    """Non-negative gradient pursuit (Blumensath & Davies 2008), batched.

    ``x: (N, D)`` inputs, ``atoms: (M, D)`` unit-norm rows, ``l0``: atoms per input.
    Each iteration adds the atom most positively correlated with the residual
    to the support, then takes an exact line-search step along the gradient
    restricted to the support; weights are clipped at 0 so that codes read as
    "how much of this example is present". Returns codes of width ``min(l0, M)``.
    """
    n, m = x.shape[0], atoms.shape[0]
    if m == 0:
        width = max(l0, 1)
        return SparseCodes(x.new_zeros(n, width), torch.zeros(n, width, dtype=torch.long, device=x.device))
    width = min(l0, m)
    indices = torch.zeros(n, width, dtype=torch.long, device=x.device)
    weights = x.new_zeros(n, width)
    residual = x.clone()
    rows = torch.arange(n, device=x.device)
    for step in range(width):
        corr = residual @ atoms.T  # (N, M)
        if step:
            corr[rows[:, None], indices[:, :step]] = float("-inf")  # never pick an atom twice
        indices[:, step] = corr.argmax(-1)
        support = atoms[indices[:, : step + 1]]  # (N, s, D)
        grad = torch.einsum("nsd,nd->ns", support, residual)
        direction = torch.einsum("ns,nsd->nd", grad, support)
        step_size = (direction * residual).sum(-1) / direction.pow(2).sum(-1).clamp_min(1e-12)
        weights[:, : step + 1] = (weights[:, : step + 1] + step_size[:, None] * grad).clamp_min(0.0)
        residual = x - torch.einsum("ns,nsd->nd", weights[:, : step + 1], support)
    return SparseCodes(weights, indices)


class ITDA(nn.Module):
    """A dictionary of real activations, encoded by gradient pursuit, grown online."""

    kind = "itda"
    atoms: Tensor

    def __init__(
        self,
        d_in: int,
        target_l0: int,
        *,
        loss_threshold: float = 0.3,
        max_atoms: int = 50_000,
        site: Site | None = None,
        standardizer: Standardizer | None = None,
        n_atoms: int = 0,
    ):
        super().__init__()
        if target_l0 < 1:
            raise DictionaryError(f"target_l0={target_l0}: ITDA needs at least one atom per input; use target_l0 >= 1")
        if not 0 < loss_threshold <= 1:
            raise DictionaryError(f"loss_threshold={loss_threshold} must be in (0, 1]: it is a relative reconstruction loss (0.1-0.6 is typical)")
        self.target_l0 = int(target_l0)
        self.loss_threshold = float(loss_threshold)
        self.max_atoms = int(max_atoms)
        self.site = site or Site()
        self.standardizer = standardizer or Standardizer(d_in)
        self.metadata: dict[str, Any] = {}
        self.register_buffer("atoms", torch.zeros(n_atoms, d_in))
        for name, (dtype, fill) in PROVENANCE.items():
            self.register_buffer(name, torch.full((n_atoms,), fill, dtype=dtype))
        self.register_buffer("firing_frequency", torch.zeros(n_atoms))
        self.register_buffer("mean_activation", torch.zeros(n_atoms))

    @property
    def d_in(self) -> int:
        return self.atoms.shape[1]

    @property
    def n_latents(self) -> int:
        return self.atoms.shape[0]

    @property
    def k(self) -> int:
        return self.target_l0

    def check_input(self, x: Tensor) -> None:
        check_width(x, self.d_in, self.site)

    def encode(self, x: Tensor) -> SparseCodes:
        """Model-space activations ``(..., d_in)`` -> codes ``(..., min(target_l0, atoms))``."""
        self.check_input(x)
        lead = x.shape[:-1]
        xn = self.standardizer.normalize(x.reshape(-1, self.d_in).to(self.atoms.dtype))
        values, indices = gradient_pursuit(xn, self.atoms, self.target_l0)
        width = values.shape[-1]
        return SparseCodes(values.reshape(*lead, width), indices.reshape(*lead, width))

    def decode(self, codes: SparseCodes) -> Tensor:
        if self.n_latents == 0:
            return self.standardizer.denormalize(codes.values.new_zeros(*codes.values.shape[:-1], self.d_in))
        return self.standardizer.denormalize(sparse_decode(codes, self.atoms))

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x)).to(x.dtype)

    def dense_codes(self, x: Tensor) -> Tensor:
        return codes_to_dense(self.encode(x), self.n_latents)

    def direction(self, feature: int, unit: bool = False) -> Tensor:
        """Model-space direction of atom ``feature`` (an actual normalised activation)."""
        return model_space_direction(self.atoms, feature, self.standardizer, unit)

    @torch.no_grad()
    def grow(self, x: Tensor, provenance: dict[str, Tensor] | None = None) -> dict[str, Any]:
        """Add the inputs of ``x: (N, d_in)`` that the dictionary reconstructs worse than the threshold.

        Candidates are taken worst-first; one is skipped when an atom accepted from
        the same batch has |cosine| above sqrt(1 - threshold) with it, since that
        atom alone already reconstructs it below the threshold."""
        self.check_input(x)
        xn = self.standardizer.normalize(x.reshape(-1, self.d_in).to(self.atoms.dtype))
        norms = xn.norm(dim=-1)
        recon = sparse_decode(gradient_pursuit(xn, self.atoms, self.target_l0), self.atoms) if self.n_latents else torch.zeros_like(xn)
        loss = (xn - recon).pow(2).sum(-1) / norms.pow(2).clamp_min(1e-12)
        loss = torch.where(norms > 1e-6, loss, torch.zeros_like(loss))
        candidates = torch.nonzero(loss > self.loss_threshold).flatten()
        candidates = candidates[loss[candidates].argsort(descending=True)]
        room = max(self.max_atoms - self.n_latents, 0)
        unit = xn[candidates] / norms[candidates, None]
        limit = math.sqrt(1 - self.loss_threshold)
        accepted: list[int] = []
        for i in range(unit.shape[0]):
            if len(accepted) >= room:
                break
            if accepted and (unit[accepted] @ unit[i]).abs().max() > limit:
                continue
            accepted.append(i)
        chosen = candidates[accepted]
        if chosen.numel():
            self.atoms = torch.cat([self.atoms, unit[accepted]])
            provenance = provenance or {}
            for name, (dtype, fill) in PROVENANCE.items():
                value = provenance.get(name)
                new = value.reshape(-1)[chosen.cpu()].to(dtype) if value is not None else torch.full((chosen.numel(),), fill, dtype=dtype)
                setattr(self, name, torch.cat([getattr(self, name), new.to(self.atoms.device)]))
            zeros = torch.zeros(chosen.numel(), device=self.atoms.device)
            self.firing_frequency = torch.cat([self.firing_frequency, zeros])
            self.mean_activation = torch.cat([self.mean_activation, zeros])
        return {
            "added": int(chosen.numel()),
            "candidates": int(candidates.numel()),
            "loss": float(loss.mean()) if loss.numel() else 0.0,
            "full": self.n_latents >= self.max_atoms,
        }

    def config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "d_in": self.d_in,
            "n_latents": self.n_latents,
            "k": self.target_l0,
            "target_l0": self.target_l0,
            "loss_threshold": self.loss_threshold,
            "max_atoms": self.max_atoms,
            "site": self.site.to_dict(),
            "metadata": self.metadata,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ITDA":
        itda = cls(
            int(config["d_in"]),
            int(config.get("target_l0") or config.get("k") or 1),
            loss_threshold=float(config.get("loss_threshold", 0.3)),
            max_atoms=int(config.get("max_atoms", 50_000)),
            site=Site.from_dict(config.get("site")),
            n_atoms=int(config["n_latents"]),
        )
        itda.metadata = dict(config.get("metadata") or {})
        return itda

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, atoms={self.n_latents}, target_l0={self.target_l0}, loss_threshold={self.loss_threshold}"
