"""Hot paths of sparse dictionaries, in plain PyTorch.

Two operations dominate training and inference:

* **encode**: ``pre = x @ W_enc.T + b_enc`` followed by a top-k. The matmul is
  unavoidable, but its backward need not be: only ``k`` of the ``M`` latents of
  each token carry gradient, so ``grad W_enc`` is a sparse-times-dense product
  (``N*k*D`` multiply-adds instead of ``N*M*D``).
* **decode**: ``sum_j values[n, j] * W_dec[indices[n, j]]``, an embedding-bag,
  never a dense ``(N, M)`` code matrix.

Shapes: ``x: (N, D)``, ``weight: (M, D)``, ``bias: (M,)``, codes ``(N, k)``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class SparseCodes(NamedTuple):
    """Fixed-width sparse codes; unused slots hold value 0 (and any index)."""

    values: Tensor
    """(N, k) activations, >= 0 for every dictionary this engine builds."""
    indices: Tensor
    """(N, k) int64 latent ids."""


class EncoderOutput(NamedTuple):
    """What the training encoder returns."""

    codes: SparseCodes
    """The selected latents of each row."""
    aux: SparseCodes | None
    """Top ``k_aux`` pre-activations among dead latents (for the AuxK loss), or None."""
    threshold: Tensor | None
    """BatchTopK only: the smallest activation kept in this batch (a 0-d tensor)."""


def sparse_decode(codes: SparseCodes, weight: Tensor) -> Tensor:
    """``(N, k)`` codes times ``weight: (M, D)`` -> ``(N, D)`` without a dense code matrix."""
    values, indices = codes
    lead = values.shape[:-1]
    out = F.embedding_bag(
        indices.reshape(-1, indices.shape[-1]),
        weight,
        per_sample_weights=values.reshape(-1, values.shape[-1]).to(weight.dtype),
        mode="sum",
    )
    return out.reshape(*lead, weight.shape[-1])


def codes_to_dense(codes: SparseCodes, n_latents: int) -> Tensor:
    """Scatter sparse codes into a dense ``(N, M)`` matrix (for analysis, not hot paths)."""
    values, indices = codes
    dense = values.new_zeros(*values.shape[:-1], n_latents)
    return dense.scatter_add_(-1, indices, values)


def threshold_codes(pre: Tensor, threshold: Tensor) -> SparseCodes:
    """Keep every pre-activation above ``threshold`` (scalar or per latent), packed to the
    widest row's count so that no active latent is dropped."""
    active = pre > threshold
    width = max(int(active.sum(-1).max().item()) if pre.numel() else 0, 1)
    values, indices = pre.masked_fill(~active, 0.0).topk(width, dim=-1, sorted=False)
    return SparseCodes(values.clamp_min(0.0), indices)


def _sparse_weight_grad(grad: Tensor, indices: Tensor, x: Tensor, n_latents: int) -> Tensor:
    """``grad_W[m] = sum over (n, j) with indices[n, j] == m of grad[n, j] * x[n]``."""
    n, k = indices.shape
    rows = indices.reshape(-1)
    cols = torch.arange(n, device=x.device).repeat_interleave(k)
    sparse = torch.sparse_coo_tensor(torch.stack([rows, cols]), grad.reshape(-1), (n_latents, n), check_invariants=False)
    return torch.sparse.mm(sparse, x)


class _FusedTopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, k, batch_topk, dead_mask, k_aux, compute_dtype):
        pre = F.linear(x.to(compute_dtype), weight.to(compute_dtype), bias.to(compute_dtype))
        out_dtype = torch.promote_types(weight.dtype, torch.float32)
        n = pre.shape[0]
        threshold = None
        if batch_topk:
            kth = pre.reshape(-1).topk(min(n * k, pre.numel()), sorted=False).values.min()
            threshold = kth.float().clamp_min(0.0)
            width = max(int((pre >= kth).sum(-1).max().item()), 1)
            values, indices = pre.topk(width, dim=-1, sorted=False)
            values = torch.where(values >= kth, values, torch.zeros_like(values))
        else:
            values, indices = pre.topk(k, dim=-1, sorted=False)
        values = values.to(out_dtype).clamp_min(0.0)

        aux_values = aux_indices = None
        if dead_mask is not None and k_aux > 0 and bool(dead_mask.any()):
            k_aux = min(k_aux, int(dead_mask.sum().item()))
            aux_values, aux_indices = pre.masked_fill(~dead_mask, float("-inf")).topk(k_aux, dim=-1, sorted=False)
            aux_values = aux_values.to(out_dtype).clamp_min(0.0)

        ctx.n_latents = weight.shape[0]
        ctx.has_aux = aux_values is not None
        saved = [x, weight, values, indices]
        if ctx.has_aux:
            saved += [aux_values, aux_indices]
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(indices)
        if ctx.has_aux:
            ctx.mark_non_differentiable(aux_indices)
        return values, indices, aux_values, aux_indices, threshold

    @staticmethod
    def backward(ctx, grad_values, _gi, grad_aux_values, _gai, _gt):
        x, weight, values, indices, *aux = ctx.saved_tensors
        grad = grad_values * (values > 0)
        if ctx.has_aux and grad_aux_values is not None:
            aux_values, aux_indices = aux
            grad = torch.cat([grad, grad_aux_values * (aux_values > 0)], dim=-1)
            indices = torch.cat([indices, aux_indices], dim=-1)
        acc = torch.promote_types(weight.dtype, torch.float32)  # accumulate in >= float32
        grad = grad.to(acc)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = sparse_decode(SparseCodes(grad, indices), weight.to(acc)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = _sparse_weight_grad(grad, indices, x.to(acc), ctx.n_latents).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.new_zeros(ctx.n_latents).index_add_(0, indices.reshape(-1), grad.reshape(-1))
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


def fused_topk_encode(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    k: int,
    *,
    batch_topk: bool = False,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
    compute_dtype: torch.dtype | None = None,
) -> EncoderOutput:
    """TopK (or BatchTopK) encoder with a sparse backward.

    ``batch_topk``: keep the ``N*k`` largest activations of the whole batch
    (rows may get more or fewer than ``k``) and report the smallest kept value,
    from which inference learns a fixed threshold.
    ``dead_mask: (M,) bool`` with ``k_aux > 0`` also returns the top ``k_aux``
    pre-activations among dead latents, with gradient, for the AuxK loss.
    ``compute_dtype`` (e.g. bf16) runs the matmul in lower precision; values and
    gradients are returned in the weights' precision (at least float32).
    """
    values, indices, aux_values, aux_indices, threshold = _FusedTopKEncode.apply(
        x, weight, bias, k, batch_topk, dead_mask, k_aux, compute_dtype or x.dtype
    )
    aux = SparseCodes(aux_values, aux_indices) if aux_values is not None else None
    return EncoderOutput(SparseCodes(values, indices), aux, threshold)
