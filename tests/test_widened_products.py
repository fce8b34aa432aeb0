"""The linear path's products of a bf16/fp16 head on a CPU without bf16/fp16 dot-product units
(sppo_fast.chunks.narrow_products_are_slow): fp32 copies of the operands, a block of vocabulary rows at a
time, in place of torch's product of the narrow operands (ATen's reference gemm there, 30-1000x slower).
Both ways are forced here whatever this CPU has, and give the same values and gradients to the rounding
of fp32 sums, against the fp64 oracle."""

import dataclasses

import pytest
import torch

import sppo_fast as sf
import sppo_fast.chunks as chunks

CPU = torch.device("cpu")


def test_widening_serves_narrow_heads_on_cpus_without_their_dot_products(monkeypatch):
    for bf16_dot in (True, False):
        monkeypatch.setattr(chunks, "_cpu_has_bf16_dot", lambda v=bf16_dot: v)
        assert chunks.narrow_products_are_slow(torch.bfloat16, CPU) is not bf16_dot
    for amx_fp16 in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda v=amx_fp16: v)
        assert chunks.narrow_products_are_slow(torch.float16, CPU) is not amx_fp16
    monkeypatch.setattr(chunks, "_cpu_has_bf16_dot", lambda: False)
    assert not chunks.narrow_products_are_slow(torch.float32, CPU)
    assert not chunks.narrow_products_are_slow(torch.float64, CPU)
    assert not chunks.narrow_products_are_slow(torch.bfloat16, torch.device("cuda"))


def _case(dtype, bias, seed=7, B=2, T=90, H=40, V=1001):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    old = -7 + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv, mask = torch.randn(B, generator=g, dtype=torch.float64), torch.ones(B, T)
    mask[1, 60:] = 0
    narrow = [t if t is None else t.to(dtype) for t in (hidden, weight, b)]
    return narrow, targets, old, adv, mask


def _loss_and_grads(narrow, targets, old, adv, mask, chunk_size, dtype=None):
    """fused_linear_policy_loss (one pass, entropy bonus on) and linear_logprobs (two passes): their
    values and the gradients of hidden, weight and bias, at the leaves' dtype or in `dtype`."""
    leaves = [None if t is None else (t if dtype is None else t.to(dtype)).detach().requires_grad_(True)
              for t in narrow]
    x, w, b = leaves
    config = dataclasses.replace(sf.PolicyLossConfig.preset("dapo"), entropy_coef=0.01)
    out = sf.fused_linear_policy_loss(x, w, targets, old.to(x.dtype), adv.to(x.dtype), mask, config, bias=b,
                                      chunk_size=chunk_size)
    logp, entropy = sf.linear_logprobs(x.reshape(-1, x.shape[-1]), w, targets.reshape(-1), bias=b,
                                       return_entropy=True, chunk_size=chunk_size)
    total = out.loss + 0.1 * logp.sum() + 0.01 * entropy.sum()
    grads = torch.autograd.grad(total, [t for t in leaves if t is not None])
    return [out.loss, logp, entropy, *grads]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_size", [64, 4096])  # several chunks (an fp32 accumulator); one (a narrow one)
def test_widened_products_match_torchs_and_the_fp64_oracle(monkeypatch, dtype, bias, chunk_size):
    narrow, *rest = _case(dtype, bias)
    monkeypatch.setattr(chunks, "WIDENED_BLOCK_BYTES", 96 * 40 * 4)  # 96 vocabulary rows a block: 11 blocks
    monkeypatch.setattr(chunks, "narrow_products_are_slow", lambda dtype, device: True)
    widened = _loss_and_grads(narrow, *rest, chunk_size)
    monkeypatch.setattr(chunks, "narrow_products_are_slow", lambda dtype, device: False)
    plain = _loss_and_grads(narrow, *rest, chunk_size)
    oracle = _loss_and_grads(narrow, *rest, chunk_size, dtype=torch.float64)
    for name, w, p, o in zip(["loss", "logp", "entropy", "hidden", "weight", "bias"], widened, plain, oracle):
        assert w.dtype == p.dtype, name
        w, p, o = w.detach(), p.detach(), o.detach()
        scale = max(1.0, float(o.abs().max()))
        # the §5 criterion against the oracle, taking torch's own product as the same-dtype computation
        assert (w.double() - o).abs().max() <= (p.double() - o).abs().max() + 1e-2 * scale, name
        # and the two differ by at most the rounding of their outputs (one ulp of the narrow dtype)
        ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
        assert ((w.double() - p.double()).abs() <= ulp * p.double().abs() + 1e-3 * scale).all(), name


def test_a_widened_product_never_copies_the_whole_head(monkeypatch):
    """The fp32 copies are one block of vocabulary rows at a time: no (V, H) fp32 tensor is made."""
    narrow, *rest = _case(torch.bfloat16, True, V=1001, H=40)
    monkeypatch.setattr(chunks, "WIDENED_BLOCK_BYTES", 96 * 40 * 4)
    monkeypatch.setattr(chunks, "narrow_products_are_slow", lambda dtype, device: True)
    widened_rows = []
    real_float = torch.Tensor.float

    def spy(t, *a, **k):
        if t.dim() == 2 and t.shape[1] == 40 and t.dtype == torch.bfloat16:
            widened_rows.append(t.shape[0])
        return real_float(t, *a, **k)

    monkeypatch.setattr(torch.Tensor, "float", spy)
    _loss_and_grads(narrow, *rest, chunk_size=64)
    assert widened_rows and max(widened_rows) <= 96
