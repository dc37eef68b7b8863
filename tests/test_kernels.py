"""The hot paths compute exactly what the dense textbook formulas compute."""
import pytest
import torch

from sae_core.kernels import SparseCodes, codes_to_dense, fused_topk_encode, sparse_decode, threshold_codes


def dense_topk_reference(x, w, b, k):
    pre = x @ w.T + b
    values, indices = pre.topk(k, dim=-1)
    dense = torch.zeros_like(pre).scatter(-1, indices, values.clamp_min(0))
    return dense


def test_sparse_decode_equals_dense_matmul():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(50, 7, generator=g, dtype=torch.float64)
    idx = torch.randint(0, 50, (9, 4), generator=g)
    val = torch.rand(9, 4, generator=g, dtype=torch.float64)
    codes = SparseCodes(val, idx)
    torch.testing.assert_close(sparse_decode(codes, w), codes_to_dense(codes, 50) @ w)


def test_sparse_decode_keeps_leading_dimensions():
    w = torch.randn(10, 3)
    codes = SparseCodes(torch.rand(2, 5, 4), torch.randint(0, 10, (2, 5, 4)))
    assert sparse_decode(codes, w).shape == (2, 5, 3)


def test_fused_encoder_forward_and_sparse_backward_match_dense_autograd():
    g = torch.Generator().manual_seed(0)
    n, d, m, k = 16, 6, 40, 5
    x = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(m, d, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(m, generator=g, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(n, m, generator=g, dtype=torch.float64)

    out = fused_topk_encode(x, w, b, k)
    fused = (codes_to_dense(out.codes, m) * upstream).sum()
    grads = torch.autograd.grad(fused, (x, w, b))

    ref = (dense_topk_reference(x, w, b, k) * upstream).sum()
    ref_grads = torch.autograd.grad(ref, (x, w, b))
    torch.testing.assert_close(fused, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_batch_topk_keeps_n_times_k_activations_over_the_batch():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, 8, generator=g)
    w = torch.randn(64, 8, generator=g)
    out = fused_topk_encode(x, w, torch.zeros(64), 3, batch_topk=True)
    kept = int((out.codes.values > 0).sum())
    assert kept == 32 * 3
    counts = (out.codes.values > 0).sum(-1)
    assert counts.max() > counts.min()  # rows share the budget unevenly
    assert out.threshold is not None and float(out.threshold) > 0


def test_aux_codes_come_only_from_dead_latents_and_carry_gradient():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 8, generator=g)
    w = torch.randn(30, 8, generator=g, requires_grad=True)
    dead = torch.zeros(30, dtype=torch.bool)
    dead[:6] = True
    out = fused_topk_encode(x, w, torch.zeros(30), 4, dead_mask=dead, k_aux=3)
    assert out.aux is not None
    assert bool((out.aux.indices < 6).all())
    out.aux.values.sum().backward()
    assert w.grad[6:].abs().sum() == 0
    assert w.grad[:6].abs().sum() > 0


def test_threshold_codes_keep_every_active_latent():
    pre = torch.tensor([[0.5, -1.0, 2.0, 0.1], [0.0, 0.0, 0.0, 3.0]])
    codes = threshold_codes(pre, torch.tensor(0.2))
    dense = codes_to_dense(codes, 4)
    torch.testing.assert_close(dense, torch.tensor([[0.5, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 3.0]]))


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_low_precision_compute_returns_float32_codes(dtype):
    x = torch.randn(4, 8)
    w = torch.randn(16, 8, requires_grad=True)
    out = fused_topk_encode(x, w, torch.zeros(16), 2, compute_dtype=dtype)
    assert out.codes.values.dtype == torch.float32
    out.codes.values.sum().backward()
    assert w.grad.dtype == torch.float32
