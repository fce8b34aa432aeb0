"""The one-pass logits path (sppo_fast.plan.logits_one_pass): the native forward also writes each row's
d logp / d logits (the basis, csrc/token_logprobs_forward.cpp) and the backward scales the rows by g_logp.
The basis against fp64 (odd vocabularies over several 4096-logit chunks whose running max grows, -inf
entries and whole -inf chunks, logits of 1e4, temperature, ignored rows, NaN and all -inf rows, row
strides); fused_policy_loss one pass against two passes and the fp64 oracle (§5) for every ratio level;
the fallbacks (a gradient through the entropy, a second backward) and the decision."""

import dataclasses

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from spec_helpers import TOLERANCE

import sppo_fast as sf
from sppo_fast import dispatch, ops, plan

native, _ = dispatch.load("native")
forward_basis = getattr(native, "token_logprobs_forward_basis", None)
pytestmark = pytest.mark.skipif(forward_basis is None, reason="no native build")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def oracle_basis(logits, targets, temperature, ignore_index=-100):
    """(1[j = t] - p_j) / T in fp64 from the logits as given; 0 on ignored rows."""
    z = logits.double() / temperature
    p = torch.softmax(z, dim=-1)
    ignored = targets == ignore_index
    onehot = torch.zeros_like(p).scatter_(1, torch.where(ignored, 0, targets).unsqueeze(1), 1.0)
    return torch.where(ignored.unsqueeze(1), 0.0, (onehot - p) / temperature)


def ulp_bound(dtype, oracle, targets, temperature, logits):
    """Half an ulp of the output dtype (the one rounding) plus fp32 exp and sum error, per entry, and the
    fp32 roundings in exp's argument z_j - max, z = x / T (an absolute error of about (|z_j| + |max|) 2^-24,
    a relative one in p_j, as in the two-pass backward and in eager fp32); at the target, (1 - p) / T also
    carries the fp32 rounding of p next to 1."""
    eps = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[dtype]  # ulp / |x|, at most
    z = logits.double() / temperature
    spread = (z.abs() + z.max(dim=1, keepdim=True).values.abs()).nan_to_num(0.0, 0.0, 0.0)
    bound = oracle.abs() * (eps / 2 + 1e-6 + spread * 2.0 ** -23)
    # p under exp(-88) is 0 and just above it may be subnormal (under 2^-125), as in every kernel here; fp16
    # rounds below its subnormals
    bound += (2.0 ** -25 if dtype == torch.float16 else 2.0 ** -125) / temperature
    rows = (targets >= 0).nonzero().squeeze(1)
    bound[rows, targets[rows]] += 2.0 ** -22 / temperature
    return bound


@settings(max_examples=60, deadline=None)
@given(N=st.integers(1, 9), V=st.sampled_from([1, 7, 100, 4096, 4097, 9001]), pad=st.integers(0, 5),
       dtype=st.sampled_from(DTYPES), temperature=st.sampled_from([1.0, 0.7]), scale=st.sampled_from([1.0, 30.0]),
       grow=st.booleans(), entropy=st.booleans(), seed=st.integers(0, 2**16))
def test_the_basis_is_d_logp_d_logits(N, V, pad, dtype, temperature, scale, grow, entropy, seed):
    """`grow`: logits rising along the row, so every chunk raises the running max and the kept exps of the
    earlier chunks are rescaled by their own factors; `pad`: a row stride larger than V."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, V + pad, generator=g) * scale
    if grow:
        x += torch.linspace(0, 40, V + pad)
    logits = x.to(dtype)[:, :V]
    targets = torch.randint(0, V, (N,), generator=g)
    targets[0] = -100 if N > 1 else targets[0]
    logp, ent, lse, basis = forward_basis(logits, targets, temperature, -100, entropy)
    ref = native.token_logprobs_forward(logits, targets, temperature, -100, entropy, torch.float64)
    for ours, theirs in zip((logp, ent, lse), ref):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert basis.dtype == dtype and basis.shape == (N, V)
    expected = oracle_basis(logits, targets, temperature)
    assert ((basis.double() - expected).abs() <= ulp_bound(dtype, expected, targets, temperature, logits)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_rows(dtype):
    """-inf entries and a whole -inf chunk (p = 0 there, exactly), logits of 1e4, a NaN row and an all
    -inf row (NaN, as the two-pass backward gives them), an ignored row (0), a target outside [0, V)
    (a vocabulary shard's: no one-hot term)."""
    V = 9000
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, V, generator=g)
    logits[0, ::3] = float("-inf")
    logits[1, 4096:8192] = float("-inf")
    logits[2] = logits[2] * 10 + 1e4
    logits[3, 17] = float("nan")
    logits[4] = float("-inf")
    logits = logits.to(dtype)
    targets = torch.tensor([1, 100, 2, 3, 4, -100])
    basis = forward_basis(logits, targets, 1.0, -100, True)[3]
    finite_rows = [0, 1, 2]
    expected = oracle_basis(logits[finite_rows], targets[finite_rows], 1.0)
    assert ((basis[finite_rows].double() - expected).abs() <= ulp_bound(dtype, expected, targets[finite_rows], 1.0,
                                                                         logits[finite_rows])).all()
    assert (basis[0, ::3] == 0).all() and (basis[0, 1::3] != 0).all() and (basis[0, 2::3] != 0).all()
    assert (basis[1, 4096:8192] == 0).all()
    assert torch.isnan(basis[3]).all() and torch.isnan(basis[4]).all()
    assert (basis[5] == 0).all()
    shard = forward_basis(logits[:1], torch.tensor([V + 3]), 1.0, -100, True)[3]
    expected = -torch.softmax(logits[:1].double(), -1)
    no_target = torch.tensor([-1])
    assert ((shard.double() - expected).abs() <= ulp_bound(dtype, expected, no_target, 1.0, logits[:1])).all()


def batch(dtype, B=3, T=40, V=5003, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :7] = False
    mask[2, 30:] = False
    logits = (torch.randn(B, T, V, generator=g) * 3).to(dtype).requires_grad_(grad)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[:, 5] = 10  # a newline-like boundary token for the segments
    return dict(logits=logits, targets=targets, old_logp=-3 + 0.3 * torch.randn(B, T, generator=g),
                advantages=torch.randn(B, generator=g), mask=mask, ref_logp=-3 + 0.3 * torch.randn(B, T, generator=g),
                segment_ids=sf.segment_ids(targets, [10], mask=mask))


def loss_and_grad(d, config, logits=None, **kw):
    logits = d["logits"] if logits is None else logits
    segs = d["segment_ids"] if config.ratio_level == "segment" else None
    out = sf.fused_policy_loss(logits, d["targets"], d["old_logp"], d["advantages"], d["mask"], config,
                               segment_ids=segs, ref_logp=d["ref_logp"], **kw)
    return out, torch.autograd.grad(out.loss, logits)[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("preset", ["dapo", "grpo", "gspo", "sspo", "ppo"])
def test_one_pass_equals_two_passes_and_the_oracle(monkeypatch, dtype, preset):
    """Every ratio level (token, sequence, segment): the gradient reaches the logits through logp alone,
    so g_logp * basis is the whole gradient; asked for (one_pass=True) for fp32 too, which the plan leaves
    to two passes by default."""
    config = sf.PolicyLossConfig.preset(preset, kl_coef=0.05)
    d = batch(dtype)
    calls = []
    real = ops.token_logprobs_forward_basis
    monkeypatch.setattr(ops, "token_logprobs_forward_basis", lambda *a: calls.append(1) or real(*a))
    one_out, one = loss_and_grad(d, config, one_pass=True)
    assert len(calls) == 1
    two_out, two = loss_and_grad(d, config, one_pass=False)
    assert len(calls) == 1
    oracle_out, oracle = loss_and_grad(d, config, logits=d["logits"].detach().double().requires_grad_(True))
    assert one.dtype == dtype
    torch.testing.assert_close(one_out.loss, two_out.loss, rtol=0, atol=0)
    scale = oracle.abs().max().item()
    err_one, err_two = ((g.double() - oracle).abs().max().item() for g in (one, two))
    assert err_one <= err_two + TOLERANCE[dtype] * max(scale, 1e-3)
    assert (one[~d["mask"]] == 0).all()


def test_one_pass_must_be_none_or_a_bool():
    d = batch(torch.bfloat16)
    with pytest.raises(TypeError, match="one_pass"):
        sf.fused_policy_loss(d["logits"], d["targets"], d["old_logp"], d["advantages"], d["mask"],
                             sf.PolicyLossConfig.preset("dapo"), one_pass=1)


def test_the_plan_takes_one_pass_for_2_byte_logits_without_an_entropy_gradient():
    dapo = sf.PolicyLossConfig.preset("dapo")
    x = torch.zeros(2, 3, dtype=torch.bfloat16, requires_grad=True)
    assert plan.logits_one_pass(x, dapo, backend=native)
    assert plan.logits_one_pass(x.half().detach().requires_grad_(True), dapo, backend=native)
    assert not plan.logits_one_pass(x.float().detach().requires_grad_(True), dapo, backend=native)
    assert not plan.logits_one_pass(x, dataclasses.replace(dapo, entropy_coef=0.01), backend=native)
    assert not plan.logits_one_pass(x.detach(), dapo, backend=native)
    assert not plan.logits_one_pass(x, dapo, inplace_backward=True, backend=native)
    assert not plan.logits_one_pass(x, dapo, shard=object(), backend=native)
    assert not plan.logits_one_pass(x, dapo, backend=dispatch.load("reference")[0])
    with torch.no_grad():
        assert not plan.logits_one_pass(x, dapo, backend=native)
    with dispatch.use_backend("reference"):
        assert not plan.logits_one_pass(x, dapo)
    fp32, with_entropy = x.float().detach().requires_grad_(True), dataclasses.replace(dapo, entropy_coef=0.01)
    assert plan.logits_one_pass(fp32, dapo, backend=native, requested=True)
    assert plan.logits_one_pass(x, with_entropy, backend=native, requested=True)
    assert not plan.logits_one_pass(x, dapo, backend=native, requested=False)
    assert not plan.logits_one_pass(x, dapo, inplace_backward=True, backend=native, requested=True)


def test_a_gradient_through_the_entropy_output_falls_back_to_two_passes():
    """A caller who adds the returned entropy to the loss: the basis alone cannot carry that term."""
    config = sf.PolicyLossConfig.preset("dapo")
    d = batch(torch.bfloat16)
    out = sf.fused_policy_loss(d["logits"], d["targets"], d["old_logp"], d["advantages"], d["mask"], config)
    got = torch.autograd.grad(out.loss + 0.1 * out.entropy.sum(), d["logits"])[0]
    x = d["logits"].detach().double().requires_grad_(True)
    ref = sf.fused_policy_loss(x, d["targets"], d["old_logp"], d["advantages"], d["mask"], config)
    expected = torch.autograd.grad(ref.loss + 0.1 * ref.entropy.sum(), x)[0]
    assert (got.double() - expected).abs().max() <= 1e-2 * expected.abs().max()


def test_a_second_backward_gives_the_same_gradient():
    """retain_graph: the first backward turned the basis into its gradient; the second one recomputes."""
    config = sf.PolicyLossConfig.preset("sppo")
    d = batch(torch.bfloat16)
    out = sf.fused_policy_loss(d["logits"], d["targets"], d["old_logp"], d["advantages"], d["mask"], config)
    first = torch.autograd.grad(out.loss, d["logits"], retain_graph=True)[0].clone()
    second = torch.autograd.grad(out.loss, d["logits"])[0]
    assert (first.float() - second.float()).abs().max() <= 2.0 ** -7 * first.float().abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_the_basis_op(dtype):
    torch.manual_seed(0)
    logits = torch.randn(5, 13).to(dtype).requires_grad_(True)
    targets = torch.randint(0, 13, (5,))
    torch.library.opcheck(ops.token_logprobs_forward_basis, (logits, targets, 1.0, -100, True))
