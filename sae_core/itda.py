"""ITDA: Inference-Time Decomposition of Activations (Leask et al. 2025).

An ITDA dictionary is not learned by gradient descent: its atoms are *real*
activation vectors, each remembered with where it came from (sample id, token
position, timestep). Because every atom is an actual activation, every feature
has a concrete example by construction, which is what makes ITDA features easy
to inspect, and "training" is a single pass over the data.

**Encoding** is a sparse approximation problem: find nonnegative weights ``w``
with at most ``L0`` nonzeros such that ``x ≈ sum_j w_j atom_j``. Solving it
exactly is NP-hard, so ITDA uses *gradient pursuit* (Blumensath & Davies 2008),
a cheap relative of orthogonal matching pursuit. Each of ``L0`` iterations

1. correlates the residual ``r = x - w @ atoms`` with every atom and adds the
   most positively correlated one to the support;
2. takes the gradient of ``||r||^2 / 2`` with respect to the support's weights
   (their correlations with ``r``), and steps along it by the exact line-search
   length ``<c, r> / <c, c>``, where ``c`` is that gradient mapped to input space;
3. clips the weights at 0, so that a code reads "how much of this example is
   present".

Unlike matching pursuit, earlier weights keep being corrected as the support
grows; unlike orthogonal matching pursuit, no least-squares system is solved.

**Growing** the dictionary: an input whose relative reconstruction loss
``||x - x_hat||^2 / ||x||^2`` exceeds ``loss_threshold`` is not explained by
the current atoms, so it becomes an atom itself. Inputs already explained are
skipped, which keeps the dictionary from filling up with near-copies.

Atoms are stored unit-norm in normalised space (see :mod:`sae_core.normalize`);
``encode`` takes and ``decode`` returns model-space activations, like the SAE,
so callers treat :class:`ITDA` and :class:`~sae_core.sae.SparseAutoencoder` alike.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .checks import mapping, real_number, required, whole_number
from .dictionary import Dictionary
from .errors import ConfigError, DictionaryError, ShardError
from .kernels import SparseCodes, sparse_decode
from .normalize import Standardizer
from .sites.site import Site

PROVENANCE: dict[str, tuple[torch.dtype, float]] = {
    "sample_id": (torch.int64, -1),
    "token": (torch.int64, -1),
    # -1, not NaN: progress is never negative, and files with NaN are refused as diverged.
    "timestep": (torch.float32, -1.0),
}
"""Provenance buffers: name -> (dtype, value meaning "unknown")."""


def gradient_pursuit(x: Tensor, atoms: Tensor, l0: int) -> SparseCodes:
    """Nonnegative gradient pursuit (Blumensath & Davies 2008), batched over rows.

    ``x: (N, D)`` inputs; ``atoms: (M, D)`` unit-norm rows; ``l0``: atoms per input.
    Returns codes ``(N, min(l0, M))``: values >= 0, distinct indices per row
    (a slot whose atom does not help keeps value 0). With no atoms at all, the
    codes are zeros of width ``max(l0, 1)`` pointing at index 0.

    Weights live in ``(N, l0)`` support slots next to their indices, and both
    the gradient step and the residual are embedding-bag decodes, so memory is
    ``O(N*M)`` for one correlation matrix plus ``O(N*D)``, never ``O(N*l0*D)``.
    The gradient is projected onto the nonnegative orthant (a weight at 0 is
    not pushed below it), so the line search measures the step actually taken.
    """
    n, m = x.shape[0], atoms.shape[0]
    if m == 0:
        width = max(l0, 1)
        return SparseCodes(x.new_zeros(n, width), torch.zeros(n, width, dtype=torch.long, device=x.device))
    atoms = atoms.to(x.dtype)
    tiny = torch.finfo(x.dtype).tiny
    indices = torch.zeros(n, 0, dtype=torch.long, device=x.device)
    weights = x.new_zeros(n, 0)
    residual = x
    for _ in range(min(l0, m)):
        corr = residual @ atoms.T  # (N, M)
        grad_support = corr.gather(1, indices)
        # Selection needs no gradient: mask in place unless autograd still needs corr.
        scores = corr.detach().clone() if corr.requires_grad else corr
        best = scores.scatter_(1, indices, float("-inf")).argmax(-1, keepdim=True)  # never pick an atom twice
        grad = torch.cat([grad_support, corr.gather(1, best)], 1)
        indices = torch.cat([indices, best], 1)
        weights = torch.cat([weights, weights.new_zeros(n, 1)], 1)
        grad = torch.where((weights > 0) | (grad > 0), grad, torch.zeros_like(grad))
        c = sparse_decode(SparseCodes(grad, indices), atoms)
        step = (c * residual).sum(-1) / c.pow(2).sum(-1).clamp_min(tiny)
        weights = (weights + step[:, None] * grad).clamp_min(0.0)
        residual = x - sparse_decode(SparseCodes(weights, indices), atoms)
    return SparseCodes(weights, indices)


def _greedy_distinct(unit: Tensor, limit: float, room: int, block: int = 2048) -> Tensor:
    """Rows of ``unit: (C, D)`` (unit-norm, in priority order) kept greedily: a row is
    dropped when a row kept before it has ``|cosine| > limit``; at most ``room`` rows.

    Returns the kept row numbers ``(K,)`` in order. Rows are compared in blocks, and
    the sequential choice within a block runs on the CPU, so a GPU batch costs one
    synchronisation per block rather than one per candidate."""
    kept: list[int] = []
    kept_rows = unit.new_zeros(0, unit.shape[1])
    for start in range(0, unit.shape[0], block):
        if len(kept) >= room:
            break
        rows = unit[start : start + block]
        free = ~((rows @ kept_rows.T).abs() > limit).any(-1)
        close = ((rows @ rows.T).abs() > limit).cpu().numpy()
        free = free.cpu().numpy()
        picked: list[int] = []
        for i in range(rows.shape[0]):
            if len(kept) + len(picked) >= room:
                break
            if free[i]:
                picked.append(i)
                free &= ~close[i]
        kept += [start + i for i in picked]
        kept_rows = torch.cat([kept_rows, rows[picked]])
    return torch.tensor(kept, dtype=torch.long, device=unit.device)


class ITDA(Dictionary):
    """A dictionary of real activations, encoded by gradient pursuit, grown online.

    Mirrors :class:`~sae_core.sae.SparseAutoencoder`'s surface (``encode``,
    ``decode``, ``direction``, ``config``/``from_config``, feature statistics);
    ``n_latents`` is the number of atoms and ``k`` the target L0."""

    kind = "itda"
    atoms: Tensor
    sample_id: Tensor
    token: Tensor
    timestep: Tensor
    firing_frequency: Tensor
    mean_activation: Tensor

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
            raise ConfigError(f"target_l0={target_l0}: ITDA needs at least one atom per input; use target_l0 >= 1")
        if not 0 < loss_threshold <= 1:
            raise ConfigError(f"loss_threshold={loss_threshold} must be in (0, 1]: it is a relative reconstruction loss (0.1-0.6 is typical)")
        self.target_l0 = int(target_l0)
        self.loss_threshold = float(loss_threshold)
        self.max_atoms = int(max_atoms)
        self.site = site or Site()
        self.standardizer = standardizer or Standardizer(d_in)
        self.metadata: dict[str, Any] = {}
        self.register_buffer("atoms", torch.zeros(n_atoms, d_in))
        for name, (dtype, unknown) in PROVENANCE.items():
            self.register_buffer(name, torch.full((n_atoms,), unknown, dtype=dtype))
        self.register_buffer("firing_frequency", torch.zeros(n_atoms))
        self.register_buffer("mean_activation", torch.zeros(n_atoms))

    @property
    def rows(self) -> Tensor:
        return self.atoms

    @property
    def k(self) -> int:
        return self.target_l0

    def _normalized_rows(self, x: Tensor) -> Tensor:
        return self.standardizer.normalize(x.reshape(-1, self.d_in).to(self.atoms.dtype))

    def encode_rows(self, x: Tensor) -> SparseCodes:
        """Model-space activations ``(N, d_in)`` -> codes ``(N, min(target_l0, atoms))``."""
        return gradient_pursuit(self._normalized_rows(x), self.atoms, self.target_l0)

    def decode_normalized(self, codes: SparseCodes) -> Tensor:
        if self.n_latents == 0:  # codes of an empty dictionary point at no atom: zeros, NaN where the codes are
            nonfinite = ~torch.isfinite(codes.values).all(-1, keepdim=True)
            return codes.values.new_zeros(*codes.values.shape[:-1], self.d_in).masked_fill(nonfinite, float("nan"))
        return sparse_decode(codes, self.atoms)

    @torch.no_grad()
    def grow(self, x: Tensor, provenance: dict[str, Tensor] | None = None) -> dict[str, Any]:
        """Add the rows of ``x: (N, d_in)`` (model space) that the dictionary reconstructs
        worse than ``loss_threshold``, as new unit-norm atoms.

        ``provenance`` maps ``sample_id`` / ``token`` / ``timestep`` to one value per row
        (or one for all rows); missing ones are stored as -1 (unknown). Candidates are
        taken worst-first, and one is skipped when an atom accepted from this batch has
        ``|cosine| > sqrt(1 - loss_threshold)`` with it: that atom alone already
        reconstructs it below the threshold. Returns ``added``, ``candidates``, ``loss``
        (mean relative loss before growing), ``full`` (``max_atoms`` reached) and
        ``codes`` (the inputs' codes before growing, for firing statistics)."""
        self.check_input(x)
        xn = self._normalized_rows(x)
        values = self._provenance_values(provenance or {}, xn.shape[0])
        norms = xn.norm(dim=-1)
        codes = gradient_pursuit(xn, self.atoms, self.target_l0)
        recon = self.decode_normalized(codes)
        loss = (xn - recon).pow(2).sum(-1) / norms.pow(2).clamp_min(1e-12)
        loss = torch.where(norms > 1e-6, loss, torch.zeros_like(loss))  # a zero row is nothing to explain
        candidates = torch.nonzero(loss > self.loss_threshold).flatten()
        candidates = candidates[loss[candidates].argsort(descending=True)]
        unit = xn[candidates] / norms[candidates, None]
        room = max(self.max_atoms - self.n_latents, 0)
        kept = _greedy_distinct(unit, math.sqrt(1 - self.loss_threshold), room)
        if kept.numel():
            chosen = candidates[kept]
            self.atoms = torch.cat([self.atoms, unit[kept]])
            for name, value in values.items():
                new = value if value.numel() == 1 else value[chosen.to(value.device)]
                old = getattr(self, name)
                setattr(self, name, torch.cat([old, new.to(old.device, old.dtype).expand(kept.numel())]))
            for name in ("firing_frequency", "mean_activation"):
                old = getattr(self, name)
                setattr(self, name, torch.cat([old, old.new_zeros(kept.numel())]))
        return {
            "added": int(kept.numel()),
            "candidates": int(candidates.numel()),
            "loss": float(loss.mean()) if loss.numel() else 0.0,
            "full": self.n_latents >= self.max_atoms,
            "codes": codes,
        }

    def _provenance_values(self, provenance: dict[str, Tensor], n: int) -> dict[str, Tensor]:
        """One flat tensor per provenance buffer, of ``n`` values or a single shared one."""
        unknown = set(provenance) - set(PROVENANCE)
        if unknown:
            raise ShardError(f"unknown ITDA provenance {', '.join(sorted(unknown))}; use {', '.join(PROVENANCE)}")
        values = {}
        for name, (dtype, missing) in PROVENANCE.items():
            value = torch.as_tensor(provenance.get(name, missing)).reshape(-1)
            if value.numel() not in (1, n):
                raise ShardError(f"provenance '{name}' has {value.numel()} values for {n} activations; give one per activation row")
            values[name] = value
        return values

    def config(self) -> dict[str, Any]:
        """Everything besides the tensors needed to rebuild this module (JSON-able)."""
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
        """An empty module with the shapes ``config`` describes (load a state dict into it).

        Every field :meth:`config` writes is required with its exact JSON type (``k`` and ``target_l0``
        say the same and either may stand for both): a header is read as written or refused."""
        itda = cls(
            whole_number(required(config, "d_in"), "d_in", 1),
            _target_l0(config),
            loss_threshold=real_number(required(config, "loss_threshold"), "loss_threshold", 0, 1, low_open=True),
            max_atoms=whole_number(required(config, "max_atoms"), "max_atoms", 1),
            site=Site.from_dict(required(config, "site")),
            n_atoms=whole_number(required(config, "n_latents"), "n_latents", 0),
        )
        itda.metadata = dict(mapping(required(config, "metadata"), "metadata"))
        return itda

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, atoms={self.n_latents}, target_l0={self.target_l0}, loss_threshold={self.loss_threshold}, site={self.site}"


def _target_l0(config: dict[str, Any]) -> int:
    """``target_l0``, or ``k`` where only that is given; both must agree when both are."""
    given = {name: whole_number(config[name], name, 1) for name in ("target_l0", "k") if name in config}
    if not given:
        raise DictionaryError("'target_l0' is missing")
    if len(set(given.values())) > 1:
        raise DictionaryError(f"k={given['k']} contradicts target_l0={given['target_l0']}")
    return next(iter(given.values()))
