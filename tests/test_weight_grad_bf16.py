"""The native backend's weight-gradient product for a bf16 head (csrc/weight_grad_bf16.cpp, chosen by
sppo_fast.chunks.weight_grad_product): fp32 sums of exact bf16 products, so against fp64 its error is that
of fp32 accumulation; through fused_linear_policy_loss the same weight gradient, to bf16 rounding, as
torch's product. Skipped where the CPU has no AVX512-BF16 (the product is then never chosen)."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import sppo_fast as sf
import sppo_fast.chunks as chunks
from sppo_fast import dispatch

native, _ = dispatch.load("native")
product = getattr(native, "accumulate_weight_grad", None)
needs_bf16_dot = pytest.mark.skipif(product is None, reason="no AVX512-BF16 (or no native build) on this CPU")


def fp32_sum_bound(grad, hidden, accumulator):
    """An error bound for fp32 sums of the n exact products (and the accumulator): n ulps of the sum of
    absolute values."""
    n = grad.shape[0] + 1
    magnitude = grad.double().abs().T @ hidden.double().abs() + accumulator.double().abs()
    return n * 2.0 ** -24 * magnitude + 1e-30


@needs_bf16_dot
@settings(max_examples=40, deadline=None)
@given(V=st.integers(1, 300), H=st.integers(1, 150), n=st.integers(1, 41), pad=st.integers(0, 9),
       accumulate=st.booleans(), seed=st.integers(0, 2**16))
def test_the_product_equals_fp64_to_fp32_summation(V, H, n, pad, accumulate, seed):
    """Odd token counts (the last pair padded), V not a multiple of the 6-row tile or the 96-row panel,
    H not a multiple of the 64-wide column block, a gradient with a row stride > V (a slice of a wider
    buffer, as a vocabulary shard's chunk is), and both accumulate and overwrite."""
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(n, V + pad, generator=g).bfloat16()[:, :V]
    hidden = (torch.randn(n, H, generator=g) * 3).bfloat16()
    start = torch.randn(V, H, generator=g)
    acc = start.clone() if accumulate else torch.full((V, H), float("nan"))
    product(acc, grad, hidden, accumulate)
    expected = grad.double().T @ hidden.double() + (start.double() if accumulate else 0)
    assert ((acc.double() - expected).abs() <= fp32_sum_bound(grad, hidden, start if accumulate else 0 * start)).all()


@needs_bf16_dot
@pytest.mark.parametrize("V, H, n", [(1000, 896, 257), (97, 4096, 64), (200, 64, 1)])
def test_model_sized_hidden_dimensions(V, H, n):
    """Qwen2-0.5B's H = 896 (14 column blocks), Llama's 4096 (64), and a single token."""
    g = torch.Generator().manual_seed(V + H + n)
    grad, hidden = torch.randn(n, V, generator=g).bfloat16(), torch.randn(n, H, generator=g).bfloat16()
    start = torch.randn(V, H, generator=g)
    acc = start.clone()
    product(acc, grad, hidden, True)
    expected = grad.double().T @ hidden.double() + start.double()
    assert ((acc.double() - expected).abs() <= fp32_sum_bound(grad, hidden, start)).all()


@needs_bf16_dot
def test_special_values_zero_rows_and_an_empty_chunk():
    """Zeros (masked rows' gradient), huge values and their signs; n = 0 leaves or zeroes the accumulator."""
    grad = torch.zeros(5, 70).bfloat16()
    grad[1, 3], grad[2, 69], grad[4, 0] = 3e30, -2.5, 1.0
    hidden = torch.ones(5, 17).bfloat16()
    hidden[2] = -4.0
    acc = torch.ones(70, 17)
    product(acc, grad, hidden, True)
    expected = 1 + grad.double().T @ hidden.double()
    torch.testing.assert_close(acc.double(), expected, rtol=2**-23, atol=0)
    empty = torch.empty(0, 70).bfloat16(), torch.empty(0, 17).bfloat16()
    product(acc, *empty, True)
    torch.testing.assert_close(acc.double(), expected, rtol=2**-23, atol=0)
    product(acc, *empty, False)
    assert (acc == 0).all()


def test_the_product_serves_only_a_bf16_head_into_an_fp32_accumulator_without_amx(monkeypatch):
    """weight_grad_product: None for an fp32 head, a bf16 accumulator (one chunk, or .grad), a backend
    without a product, and a CPU with AMX (oneDNN's matmul on AMX tiles is kept there)."""
    bf16, fp32 = torch.empty(4, 3, dtype=torch.bfloat16), torch.empty(4, 3)
    fake = type("Backend", (), {"accumulate_weight_grad": staticmethod(lambda *a: None)})
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert chunks.weight_grad_product(fake, bf16, fp32) is fake.accumulate_weight_grad
    assert chunks.weight_grad_product(fake, fp32, fp32) is None
    assert chunks.weight_grad_product(fake, bf16, bf16) is None
    assert chunks.weight_grad_product(fake, bf16, None) is None
    assert chunks.weight_grad_product(dispatch.load("reference")[0], bf16, fp32) is None
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert chunks.weight_grad_product(fake, bf16, fp32) is None


@needs_bf16_dot
def test_a_chunked_bf16_head_gets_the_same_weight_gradient_as_with_torchs_product(monkeypatch):
    """fused_linear_policy_loss over 3 chunks with the native product, then with torch's (the product
    turned off): every weight-gradient entry within a bf16 ulp (both round fp32 sums once), nearly all
    equal, and both as close to the fp64 oracle."""
    g = torch.Generator().manual_seed(3)
    B, T, H, V = 2, 150, 72, 1999
    hidden64 = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight64 = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5
    targets = torch.randint(0, V, (B, T), generator=g)
    old = -8 + 0.1 * torch.randn(B, T, generator=g)
    adv, mask = torch.randn(B, generator=g), torch.ones(B, T)
    mask[1, 100:] = 0
    config = sf.PolicyLossConfig.preset("dapo")
    calls = []
    real = chunks.weight_grad_product
    monkeypatch.setattr(chunks, "weight_grad_product", lambda *a: calls.append(real(*a)) or calls[-1])

    def weight_grad(h, w):
        w = w.detach().requires_grad_(True)
        out = sf.fused_linear_policy_loss(h, w, targets, old.to(h.dtype), adv.to(h.dtype), mask, config,
                                          chunk_size=128)
        return torch.autograd.grad(out.loss, w)[0]

    fast = weight_grad(hidden64.bfloat16(), weight64.bfloat16())
    assert calls[-1] is product
    monkeypatch.setattr(chunks, "weight_grad_product", lambda *a: None)
    plain = weight_grad(hidden64.bfloat16(), weight64.bfloat16())
    oracle = weight_grad(hidden64.bfloat16().double(), weight64.bfloat16().double())
    ulp = plain.float().abs() * 2.0 ** -7
    assert ((fast.float() - plain.float()).abs() <= ulp).all()
    assert (fast != plain).float().mean() < 0.01
    scale = oracle.abs().max()
    assert (fast.double() - oracle).abs().max() <= (plain.double() - oracle).abs().max() + 1e-3 * scale


@pytest.mark.parametrize("use_product", [True, False])
def test_an_accumulator_in_vocabulary_blocks_gives_the_one_blocks_gradient(monkeypatch, use_product):
    """chunks.LinearGrads holds a bf16 head's fp32 accumulator as blocks of vocabulary rows (about 32 MiB
    each; here 96 rows, so that V = 1001 makes 11 blocks, the last one short): the weight gradient is the
    same, bit for bit, as with one block, through the native product and through torch's."""
    if use_product and product is None:
        pytest.skip("no AVX512-BF16 (or no native build) on this CPU")
    if not use_product:
        monkeypatch.setattr(chunks, "weight_grad_product", lambda *a: None)
    g = torch.Generator().manual_seed(5)
    B, T, H, V = 2, 100, 24, 1001
    hidden = torch.randn(B, T, H, generator=g).bfloat16()
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).bfloat16()
    bias = torch.randn(V, generator=g).bfloat16()
    targets = torch.randint(0, V, (B, T), generator=g)
    old, adv, mask = -7 + 0.1 * torch.randn(B, T, generator=g), torch.randn(B, generator=g), torch.ones(B, T)
    config = sf.PolicyLossConfig.preset("dapo")
    real = chunks._accumulator_blocks
    seen = []

    def grads(block_bytes):
        monkeypatch.setattr(chunks, "_accumulator_blocks",
                            lambda w, d: seen.append(real(w, d, block_bytes)) or seen[-1])
        x, w, b = (t.detach().requires_grad_(True) for t in (hidden, weight, bias))
        out = sf.fused_linear_policy_loss(x, w, targets, old, adv, mask, config, bias=b, chunk_size=64)
        return torch.autograd.grad(out.loss, [x, w, b])

    blocked = grads(96 * H * 4)  # 96 rows a block
    assert len(seen[-1]) == 11 and seen[-1][-1] == slice(960, 1001)
    whole = grads(1 << 40)
    assert len(seen[-1]) == 1
    for a, b in zip(blocked, whole):
        assert torch.equal(a, b)
