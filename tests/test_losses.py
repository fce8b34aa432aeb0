"""The loss family (docs/api.md §3.2-§3.6): presets, properties, hand-computed cases, and the fused ops
against the fp64 reference on every backend."""

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from spec_helpers import assert_spec_close

import sppo_fast as sf
from sppo_fast import reference
from sppo_fast.losses import PRESETS

MASKS = ("full", "ragged", "one_sequence_masked")


def make_batch(B=3, T=6, V=23, mask_kind="ragged", seed=0, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=gen) * 2).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=gen)
    old_logp = torch.log_softmax(torch.randn(B, T, V, generator=gen) * 2, -1).gather(
        -1, targets.unsqueeze(-1)).squeeze(-1)
    old_logp = 0.7 * old_logp + 0.3 * torch.log_softmax(logits.float(), -1).gather(
        -1, targets.unsqueeze(-1)).squeeze(-1)  # ratios near and far from 1
    ref_logp = old_logp + 0.1 * torch.randn(B, T, generator=gen)
    advantages = torch.randn(B, generator=gen)
    mask = torch.ones(B, T)
    if mask_kind in ("ragged", "one_sequence_masked"):
        for b in range(B):
            mask[b, T - b:] = 0
    if mask_kind == "one_sequence_masked":
        mask[1] = 0
    tokens = torch.where(torch.rand(B, T, generator=gen) < 0.3, torch.tensor(0), targets)
    segments = sf.segment_ids(tokens, [0], mask=mask)
    batch = dict(logits=logits, targets=targets, old_logp=old_logp, advantages=advantages, mask=mask,
                 segment_ids=segments, ref_logp=ref_logp)
    return {k: v.to(device) for k, v in batch.items()}


def config_for(name, **extra):
    return PolicyLossConfig.preset(name, **extra)


PolicyLossConfig = sf.PolicyLossConfig


def run_fused(batch, config, dtype, double=False):
    logits = batch["logits"].double() if double else batch["logits"]
    logits = logits.detach().requires_grad_(True)
    fn = reference.fused_policy_loss if double else sf.fused_policy_loss
    out = fn(logits, batch["targets"], batch["old_logp"], batch["advantages"], batch["mask"], config,
             segment_ids=batch["segment_ids"], ref_logp=batch["ref_logp"])
    out.loss.backward()
    return out, logits.grad


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("mask_kind", MASKS)
def test_fused_policy_loss_every_preset_against_fp64(backend, preset, mask_kind):
    _, device = backend
    batch = make_batch(mask_kind=mask_kind, seed=len(preset), device=device)
    config = config_for(preset, kl_coef=0.05, entropy_coef=0.01)
    ours, grad = run_fused(batch, config, torch.float32)
    oracle, grad64 = run_fused(batch, config, torch.float32, double=True)
    eager, grad_eager = run_fused({**batch, "logits": batch["logits"]}, config, torch.float32)
    assert ours.loss.dim() == 0 and ours.logp.shape == (3, 6) and ours.entropy.dtype == torch.float32
    assert_spec_close(ours.loss, oracle.loss, oracle.loss, torch.float32, "loss")
    assert_spec_close(grad, grad64, grad64, torch.float32, "grad")
    for key in ("clipfrac", "ratio_mean", "approx_kl", "entropy", "kl"):
        expected = oracle.metrics[key].item()
        assert abs(ours.metrics[key].item() - expected) < 1e-5 * max(1.0, abs(expected)), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("preset", ["dapo", "gspo", "sspo"])
def test_fused_policy_loss_half_precision(backend, dtype, preset):
    _, device = backend
    batch = make_batch(seed=3, dtype=dtype, device=device)
    config = config_for(preset)
    ours, grad = run_fused(batch, config, dtype)
    oracle, grad64 = run_fused(batch, config, dtype, double=True)
    eager_logits = batch["logits"].detach().requires_grad_(True)
    logp, ent = reference.token_logprobs(eager_logits, batch["targets"], return_entropy=True)
    eager = sf.policy_loss(logp.to(dtype), batch["old_logp"], batch["advantages"], batch["mask"], config,
                           segment_ids=batch["segment_ids"], entropy=ent.to(dtype))
    eager.loss.backward()
    assert grad.dtype == dtype
    assert_spec_close(ours.loss, eager.loss, oracle.loss, dtype, "loss")
    assert_spec_close(grad, eager_logits.grad, grad64, dtype, "grad")


@pytest.mark.parametrize("preset", ["grpo", "dapo", "gspo", "sspo", "sppo"])
@pytest.mark.parametrize("chunk_size", [3, 10, None], ids=["token-chunks", "sequence-chunks", "default"])
def test_fused_linear_policy_loss_against_fp64(backend, preset, chunk_size):
    _, device = backend
    torch.manual_seed(11)
    B, T, H, V = 2, 5, 12, 41
    batch = make_batch(B, T, V, seed=4, device=device)
    hidden = torch.randn(B, T, H, device=device)
    weight = torch.randn(V, H, device=device) * 0.3
    bias = torch.randn(V, device=device) * 0.1
    config = config_for(preset, kl_coef=0.05, entropy_coef=0.01)
    scale = 1.0 if chunk_size is None else 2.5  # both backward paths: returned as is, or scaled

    def run(fn, h, w, b):
        h, w, b = (x.detach().requires_grad_(True) for x in (h, w, b))
        out = fn(h, w, batch["targets"], batch["old_logp"], batch["advantages"], batch["mask"], config,
                 bias=b, segment_ids=batch["segment_ids"], ref_logp=batch["ref_logp"], temperature=0.8)
        (scale * out.loss).backward()
        return [out.loss, out.logp, out.entropy, h.grad, w.grad, b.grad], out.metrics

    (ours, metrics) = run(lambda *a, **k: sf.fused_linear_policy_loss(*a, chunk_size=chunk_size, **k),
                          hidden, weight, bias)
    oracle, oracle_metrics = run(reference.fused_linear_policy_loss, hidden.double(), weight.double(),
                                 bias.double())
    eager, _ = run(reference.fused_linear_policy_loss, hidden, weight, bias)
    on_mask = batch["mask"].bool()
    for i in (1, 2):  # logp and entropy: the one-pass path leaves masked rows out (0 there)
        ours[i], eager[i], oracle[i] = (x[on_mask] for x in (ours[i], eager[i], oracle[i]))
    for name, o, e, r in zip(["loss", "logp", "entropy", "hidden", "weight", "bias"], ours, eager, oracle):
        assert_spec_close(o, e, r, torch.float32, name)
    assert set(metrics) == set(oracle_metrics)
    for key in metrics:
        expected = oracle_metrics[key].item()
        assert abs(metrics[key].item() - expected) < 1e-5 * max(1.0, abs(expected)), key


def test_fused_linear_masked_first_chunk_and_no_grad(backend):
    """A first chunk with no unmasked row (its weight-gradient matmul has no rows), and the pass without
    gradients (same loss, logp, entropy and metrics, no gradient work)."""
    _, device = backend
    B, T, H, V = 3, 4, 8, 29
    batch = make_batch(B, T, V, seed=6, device=device)
    batch["mask"][0] = 0
    hidden, weight = torch.randn(B, T, H, device=device), torch.randn(V, H, device=device) * 0.3
    config = config_for("gspo")
    args = (batch["targets"], batch["old_logp"], batch["advantages"], batch["mask"], config)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = sf.fused_linear_policy_loss(h, w, *args, chunk_size=T)
    out.loss.backward()
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    oracle = reference.fused_linear_policy_loss(h64, w64, *args)
    oracle.loss.backward()
    h32, w32 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    eager = reference.fused_linear_policy_loss(h32, w32, *args)
    eager.loss.backward()
    for name, o, e, r in [("hidden", h.grad, h32.grad, h64.grad), ("weight", w.grad, w32.grad, w64.grad)]:
        assert_spec_close(o, e, r, torch.float32, name)
    with torch.no_grad():
        plain = sf.fused_linear_policy_loss(h, w, *args, chunk_size=T)
    for name in ("loss", "logp", "entropy"):
        torch.testing.assert_close(getattr(plain, name), getattr(out, name), msg=name)
    for key in out.metrics:
        torch.testing.assert_close(plain.metrics[key], out.metrics[key], msg=key)


def test_fused_equals_policy_loss_of_token_logprobs(backend):
    _, device = backend
    batch = make_batch(seed=5, device=device)
    config = config_for("sspo", kl_coef=0.1, entropy_coef=0.02)
    fused, grad = run_fused(batch, config, torch.float32)
    logits = batch["logits"].detach().requires_grad_(True)
    logp, ent = sf.token_logprobs(logits, batch["targets"], return_entropy=True)
    composed = sf.policy_loss(logp, batch["old_logp"], batch["advantages"], batch["mask"], config,
                              segment_ids=batch["segment_ids"], entropy=ent, ref_logp=batch["ref_logp"])
    composed.loss.backward()
    torch.testing.assert_close(fused.loss, composed.loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, logits.grad, rtol=0, atol=0)


def test_all_masked_batch_gives_zero_loss_and_zero_gradient(backend):
    _, device = backend
    batch = make_batch(mask_kind="full", device=device)
    batch["mask"] = torch.zeros_like(batch["mask"])
    for preset in PRESETS:
        out, grad = run_fused(batch, config_for(preset), torch.float32)
        assert out.loss.item() == 0 and not torch.isnan(out.loss)
        assert (grad == 0).all(), preset
        assert all(torch.isfinite(v) for v in out.metrics.values())


def test_empty_batch(backend):
    _, device = backend
    logits = torch.randn(0, 4, 9, device=device, requires_grad=True)
    zeros = torch.zeros(0, 4, device=device)
    out = sf.fused_policy_loss(logits, torch.zeros(0, 4, dtype=torch.long, device=device), zeros,
                               torch.zeros(0, device=device), zeros, config_for("grpo"))
    out.loss.backward()
    assert out.loss.item() == 0 and out.logp.shape == (0, 4) and logits.grad.shape == logits.shape


# ----------------------------------------------------------------------------------------------------
# policy_loss on (B, T): gradcheck and properties


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_policy_loss_gradcheck(preset):
    batch = make_batch(seed=7)
    config = config_for(preset, kl_coef=0.1, entropy_coef=0.05, kl_estimator="k3")
    logp = (batch["old_logp"] + 0.05 * torch.randn(3, 6)).double().requires_grad_(True)
    entropy = torch.rand(3, 6, dtype=torch.float64, requires_grad=True)

    def fn(lp, ent):
        return sf.policy_loss(lp, batch["old_logp"].double(), batch["advantages"].double(), batch["mask"],
                              config, segment_ids=batch["segment_ids"], entropy=ent,
                              ref_logp=batch["ref_logp"].double()).loss

    assert torch.autograd.gradcheck(fn, (logp, entropy))


def test_ratio_levels_coincide_when_old_equals_new():
    batch = make_batch(seed=8)
    logp = batch["old_logp"]
    losses = []
    for level in ("token", "sequence", "segment"):
        config = config_for("grpo", ratio_level=level)
        out = sf.policy_loss(logp, logp, batch["advantages"], batch["mask"], config,
                             segment_ids=batch["segment_ids"])
        assert out.metrics["ratio_mean"].item() == pytest.approx(1.0)
        assert out.metrics["ratio_max"].item() == pytest.approx(1.0)
        losses.append(out.loss)
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(losses[0], losses[2])


def _loss_and_grad(batch, config, segment_ids):
    logp = (batch["old_logp"] + 0.2 * torch.randn(batch["old_logp"].shape,
                                                  generator=torch.Generator().manual_seed(1)))
    logp = logp.requires_grad_(True)
    out = sf.policy_loss(logp, batch["old_logp"], batch["advantages"], batch["mask"], config,
                         segment_ids=segment_ids, entropy=torch.ones_like(logp))
    out.loss.backward()
    return out.loss, logp.grad


def test_segment_equals_sequence_without_boundaries():
    batch = make_batch(seed=9)
    one_segment = sf.segment_ids(batch["targets"], [], mask=batch["mask"])
    seg = _loss_and_grad(batch, config_for("gspo", ratio_level="segment"), one_segment)
    seq = _loss_and_grad(batch, config_for("gspo"), None)
    torch.testing.assert_close(seg, seq)


def test_sequence_equals_token_with_one_token_per_sequence():
    batch = make_batch(B=4, T=3, seed=10)
    batch["mask"] = torch.zeros(4, 3)
    batch["mask"][torch.arange(4), torch.tensor([0, 2, 1, 0])] = 1
    seq = _loss_and_grad(batch, config_for("gspo", clip_low=0.2, clip_high=0.2), None)
    tok = _loss_and_grad(batch, config_for("grpo"), None)
    torch.testing.assert_close(seq, tok)


@settings(max_examples=25)
@given(B=st.integers(1, 4), T=st.integers(1, 7), seed=st.integers(0, 10_000),
       preset=st.sampled_from(sorted(PRESETS)))
def test_hypothesis_loss_is_finite_and_masked_tokens_get_no_gradient(B, T, seed, preset):
    batch = make_batch(B, T, 5, mask_kind="ragged", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    batch["mask"] = (torch.rand(B, T, generator=gen) < 0.6).float()
    logp = (batch["old_logp"] + torch.randn(B, T, generator=gen)).requires_grad_(True)
    out = sf.policy_loss(logp, batch["old_logp"], batch["advantages"], batch["mask"], config_for(preset),
                         segment_ids=sf.segment_ids(batch["targets"], [1, 2], mask=batch["mask"]),
                         entropy=torch.rand(B, T, generator=gen))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert (logp.grad[batch["mask"] == 0] == 0).all()


# ----------------------------------------------------------------------------------------------------
# Hand-computed cases


def _single(logp, old, adv, config, mask=None, **kw):
    logp = torch.tensor(logp, dtype=torch.float64).reshape(1, -1)
    old = torch.tensor(old, dtype=torch.float64).reshape(1, -1)
    mask = torch.ones_like(logp) if mask is None else torch.tensor(mask, dtype=torch.float64).reshape(1, -1)
    return sf.policy_loss(logp, old, torch.tensor([adv], dtype=torch.float64), mask, config, **kw)


def test_clipping_and_dual_clip_by_hand():
    ppo = config_for("ppo")  # clip 0.2, dual clip 3
    # A > 0, ratio e^0.5 = 1.65 > 1.2: clipped at 1.2
    out = _single([0.5], [0.0], 2.0, ppo)
    assert out.loss.item() == pytest.approx(-2.0 * 1.2)
    assert out.metrics["clipfrac"].item() == 1.0
    # A < 0, ratio e^2 = 7.39: max(7.39, 1.2) * 1 = 7.39 > 3 -> dual clip gives 3 * |A|
    out = _single([2.0], [0.0], -1.0, ppo)
    assert out.loss.item() == pytest.approx(3.0)
    assert out.metrics["dual_clipfrac"].item() == 1.0
    # A < 0, ratio e^-0.5 = 0.61 < 0.8: clipped branch 0.8 is larger
    out = _single([-0.5], [0.0], -1.0, config_for("grpo"))
    assert out.loss.item() == pytest.approx(0.8)
    # unclipped
    out = _single([0.1], [0.0], 1.0, config_for("grpo"))
    assert out.loss.item() == pytest.approx(-math.exp(0.1))
    assert out.metrics["clipfrac"].item() == 0.0


def test_log_ratio_clamp():
    out = _single([100.0], [0.0], -1.0, config_for("grpo"))
    assert out.metrics["ratio_max"].item() == pytest.approx(math.exp(20.0), rel=1e-6)


def test_aggregations_by_hand():
    logp = torch.zeros(2, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]], dtype=torch.float64)
    wide = dict(clip_low=1.0, clip_high=1e9)  # ratio 1: l_t = -A_t

    def loss(aggregation, **kw):
        config = config_for("grpo", aggregation=aggregation, **wide, **kw)
        return sf.policy_loss(logp, logp, adv, mask, config, normalizer=kw.pop("normalizer", None)).loss.item()

    assert loss("token-mean") == pytest.approx(-(1 + 2 + 3 + 4) / 4)
    assert loss("seq-mean-token-mean") == pytest.approx(-((1 + 2 + 3) / 3 + 4) / 2)
    assert loss("seq-mean-token-sum") == pytest.approx(-(6 + 4) / 2)
    assert loss("seq-mean-token-sum-norm") == pytest.approx(-10 / (2 * 4))
    assert loss("seq-mean-token-sum-norm", max_length_norm=10) == pytest.approx(-10 / (2 * 10))
    config = config_for("grpo", aggregation="token-mean", **wide)
    assert sf.policy_loss(logp, logp, adv, mask, config, normalizer=8).loss.item() == pytest.approx(-10 / 8)
    config = config_for("grpo", aggregation="seq-mean-token-mean", **wide)
    assert sf.policy_loss(logp, logp, adv, mask, config, normalizer=4).loss.item() == pytest.approx(-(2 + 4) / 4)


def test_kl_estimators_by_hand():
    d = 0.3  # ref_logp - logp
    for estimator, expected in (("k1", -d), ("k2", d * d / 2), ("k3", math.exp(d) - d - 1)):
        config = config_for("grpo", kl_coef=1.0, kl_estimator=estimator, clip_low=1.0, clip_high=1e9)
        out = _single([0.0], [0.0], 0.0, config, ref_logp=torch.tensor([[d]], dtype=torch.float64))
        assert out.loss.item() == pytest.approx(expected)
        assert out.metrics["kl"].item() == pytest.approx(expected)
    config = config_for("grpo", kl_coef=1.0, kl_estimator="k3")
    out = _single([0.0], [0.0], 0.0, config, ref_logp=torch.tensor([[30.0]], dtype=torch.float64))
    assert out.loss.item() == pytest.approx(10.0)  # k3 capped at 10


def test_entropy_bonus():
    config = config_for("grpo", entropy_coef=0.5, clip_low=1.0, clip_high=1e9)
    out = _single([0.0, 0.0], [0.0, 0.0], 0.0, config, entropy=torch.tensor([[2.0, 4.0]], dtype=torch.float64))
    assert out.loss.item() == pytest.approx(-0.5 * 3.0)
    assert out.metrics["entropy"].item() == pytest.approx(3.0)


def test_entropy_adaptive_bounds_by_hand():
    ea = sf.EntropyAdaptiveClip(low_threshold=0.5, high_threshold=1.0, alpha=0.2, low_entropy_lower=0.8)
    config = config_for("grpo", ratio_level="token", entropy_adaptive=ea, clip_low=0.3, clip_high=0.3,
                        aggregation="token-mean")
    # three segments: high entropy (1.5), low (0.1), middle (0.7); ratio e^1 = 2.72 for A > 0
    entropy = torch.tensor([[1.5, 1.5, 0.1, 0.1, 0.7, 0.7]], dtype=torch.float64)
    segments = torch.tensor([[0, 0, 1, 1, 2, 2]])
    out = _single([1.0] * 6, [0.0] * 6, 1.0, config, entropy=entropy, segment_ids=segments)
    expected = -(2 * (1 + 0.2 + 1.5) + 2 * 1.3 + 2 * 1.3) / 6
    assert out.loss.item() == pytest.approx(expected)
    # A < 0 and ratio e^-1 = 0.37: low-entropy lower bound 0.8, others 1 - clip_low = 0.7
    out = _single([-1.0] * 6, [0.0] * 6, -1.0, config, entropy=entropy, segment_ids=segments)
    assert out.loss.item() == pytest.approx((2 * 0.7 + 2 * 0.8 + 2 * 0.7) / 6)


def test_segment_ratio_by_hand():
    config = config_for("sspo", entropy_adaptive=None, clip_low=1.0, clip_high=1e9, aggregation="token-mean")
    segments = torch.tensor([[0, 0, 1, -1]])
    out = _single([0.2, 0.4, 1.0, 5.0], [0.0] * 4, 1.0, config, mask=[1, 1, 1, 0], segment_ids=segments)
    expected = -(2 * math.exp(0.3) + math.exp(1.0)) / 3
    assert out.loss.item() == pytest.approx(expected)


def test_presets_match_the_spec_table():
    table = {
        "ppo": ("token", 0.2, 0.2, 3.0, False, "token-mean", "gae"),
        "grpo": ("token", 0.2, 0.2, None, False, "seq-mean-token-mean", "group_std"),
        "dapo": ("token", 0.2, 0.28, None, False, "token-mean", "group_std"),
        "dr_grpo": ("token", 0.2, 0.2, None, False, "seq-mean-token-sum-norm", "group_none"),
        "rloo": ("token", 0.2, 0.2, None, False, "token-mean", "rloo"),
        "gspo": ("sequence", 3e-4, 4e-4, None, False, "seq-mean-token-mean", "group_std"),
        "sspo": ("segment", 0.3, 0.3, None, True, "seq-mean-token-mean", "group_std"),
        "sppo": ("token", 0.2, 0.2, 3.0, False, "token-mean", "sppo"),
    }
    for name, row in table.items():
        c = PolicyLossConfig.preset(name)
        assert (c.ratio_level, c.clip_low, c.clip_high, c.dual_clip, c.entropy_adaptive is not None,
                c.aggregation, c.advantage) == row, name
        assert (c.kl_coef, c.kl_estimator, c.entropy_coef, c.max_length_norm, c.log_ratio_clamp) == (
            0.0, "k3", 0.0, None, 20.0)
    assert PolicyLossConfig.preset("sspo").entropy_adaptive == sf.EntropyAdaptiveClip()
    assert PolicyLossConfig.preset("dapo", kl_coef=0.1).kl_coef == 0.1
