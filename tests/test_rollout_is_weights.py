"""`rollout_is_weights`: the rollout engine's per-token importance-sampling correction (TRL's
`importance_sampling_ratio`, Liger's `vllm_is_ratio`, verl's `rollout_is_weights`) on policy_loss and
the fused losses: TRL 1.16's semantics by hand, the fused ops against fp64 on every backend (values and
gradients), and the argument checks."""

import pytest
import torch
from spec_helpers import assert_spec_close
from test_losses import config_for, make_batch

import sppo_fast as sf
from sppo_fast import reference


def is_weights(B, T, shape, seed=0, device="cpu"):
    """Positive weights far from 1 and a few exact zeros (TRL's *_mask modes zero a token out)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(B, T, generator=gen) * 1.8 + 0.1
    w[torch.rand(B, T, generator=gen) < 0.15] = 0.0
    w = {"token": w, "sequence": w[:, 0], "sequence_column": w[:, :1]}[shape]
    return w.to(device)


def trl_loss(logp, old_logp, advantages, mask, is_ratio, *, eps_low, eps_high, beta, ref_logp, loss_type):
    """TRL 1.16 `GRPOTrainer._compute_loss` for token-level ratios, written out: the IS ratio multiplies
    the clipped term, then `beta * k3` is added unweighted, then the aggregation."""
    coef_1 = torch.exp(logp - old_logp)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    per_token = per_token * (is_ratio if is_ratio.dim() == 2 else is_ratio.unsqueeze(1))
    kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    per_token = per_token + beta * kl
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)  # bnpo / dapo over one batch


@pytest.mark.parametrize("loss_type,preset", [("grpo", "grpo"), ("bnpo", "dapo")])
@pytest.mark.parametrize("shape", ["token", "sequence", "sequence_column"])
def test_policy_loss_weights_like_trl(loss_type, preset, shape):
    """Where TRL puts the ratio: on the clipped policy-gradient term only, never on the KL term."""
    batch = make_batch(B=3, T=6, mask_kind="full", seed=2)
    logp = torch.log_softmax(batch["logits"].double(), -1).gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)
    old, ref = batch["old_logp"].double(), batch["ref_logp"].double()
    weights = is_weights(3, 6, shape, seed=1).double()
    beta = 0.04
    config = config_for(preset, kl_coef=beta)
    lp_ours, lp_trl = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    ours = sf.policy_loss(lp_ours, old, batch["advantages"].double(), batch["mask"], config, ref_logp=ref,
                          rollout_is_weights=weights)
    theirs = trl_loss(lp_trl, old, batch["advantages"].double(), batch["mask"].double(), weights,
                      eps_low=config.clip_low, eps_high=config.clip_high, beta=beta, ref_logp=ref,
                      loss_type=loss_type)
    ours.loss.backward()
    theirs.backward()
    torch.testing.assert_close(ours.loss, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lp_ours.grad, lp_trl.grad, rtol=1e-12, atol=1e-12)


def test_entropy_bonus_is_not_weighted():
    """A zero weight removes a token's policy-gradient term; its entropy gradient stays."""
    batch = make_batch(B=2, T=4, mask_kind="full", seed=3)
    logp, ent = (torch.randn(2, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    config = config_for("dapo", entropy_coef=0.1)
    out = sf.policy_loss(logp, batch["old_logp"].double(), batch["advantages"].double(), batch["mask"], config,
                         entropy=ent, rollout_is_weights=torch.zeros(2, 4, dtype=torch.float64))
    out.loss.backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))
    torch.testing.assert_close(ent.grad, torch.full_like(ent, -0.1 / 8))


def test_unit_weights_change_nothing_and_get_no_gradient():
    batch = make_batch(seed=4)
    config = config_for("sspo", kl_coef=0.05, entropy_coef=0.01)
    logits = batch["logits"].double()
    args = (batch["targets"], batch["old_logp"], batch["advantages"], batch["mask"], config)
    kw = dict(segment_ids=batch["segment_ids"], ref_logp=batch["ref_logp"])
    ones = torch.ones(3, 6, dtype=torch.float64, requires_grad=True)
    plain = reference.fused_policy_loss(logits, *args, **kw)
    weighted = reference.fused_policy_loss(logits, *args, **kw, rollout_is_weights=ones)
    assert torch.equal(plain.loss, weighted.loss)
    assert not weighted.loss.requires_grad  # logits are constants here, and so are the weights
    for key in plain.metrics:  # the metrics describe the ratios, not the correction
        assert torch.equal(plain.metrics[key], weighted.metrics[key]), key


@pytest.mark.parametrize("preset", ["grpo", "gspo", "sspo", "sppo"])  # the three ratio levels, the dual clip
@pytest.mark.parametrize("shape", ["token", "sequence"])
def test_fused_policy_loss_with_weights_against_fp64(backend, preset, shape):
    _, device = backend
    batch = make_batch(seed=len(preset), device=device)
    config = config_for(preset, kl_coef=0.05, entropy_coef=0.01)
    weights = is_weights(3, 6, shape, seed=5, device=device)

    def run(fn, logits):
        logits = logits.detach().requires_grad_(True)
        out = fn(logits, batch["targets"], batch["old_logp"], batch["advantages"], batch["mask"], config,
                 segment_ids=batch["segment_ids"], ref_logp=batch["ref_logp"], rollout_is_weights=weights)
        out.loss.backward()
        return out.loss, logits.grad

    ours = run(sf.fused_policy_loss, batch["logits"])
    oracle = run(reference.fused_policy_loss, batch["logits"].double())
    eager = run(reference.fused_policy_loss, batch["logits"])
    unweighted = sf.fused_policy_loss(batch["logits"], batch["targets"], batch["old_logp"], batch["advantages"],
                                      batch["mask"], config, segment_ids=batch["segment_ids"],
                                      ref_logp=batch["ref_logp"])
    assert not torch.allclose(ours[0], unweighted.loss)  # the weights do something
    for name, o, e, r in zip(["loss", "grad"], ours, eager, oracle):
        assert_spec_close(o, e, r, torch.float32, name)


@pytest.mark.parametrize("preset", ["dapo", "sspo"])
@pytest.mark.parametrize("chunk_size", [3, 10, None], ids=["token-chunks", "sequence-chunks", "default"])
def test_fused_linear_policy_loss_with_weights_against_fp64(backend, preset, chunk_size):
    """Both linear paths: the one-pass sequence chunks and linear_logprobs + the loss stage."""
    _, device = backend
    torch.manual_seed(13)
    B, T, H, V = 2, 5, 12, 41
    batch = make_batch(B, T, V, seed=4, device=device)
    hidden, weight = torch.randn(B, T, H, device=device), torch.randn(V, H, device=device) * 0.3
    bias = torch.randn(V, device=device) * 0.1
    config = config_for(preset, kl_coef=0.05, entropy_coef=0.01)
    weights = is_weights(B, T, "token", seed=6, device=device)

    def run(fn, h, w, b):
        h, w, b = (x.detach().requires_grad_(True) for x in (h, w, b))
        out = fn(h, w, batch["targets"], batch["old_logp"], batch["advantages"], batch["mask"], config, bias=b,
                 segment_ids=batch["segment_ids"], ref_logp=batch["ref_logp"], temperature=0.8,
                 rollout_is_weights=weights)
        (1.5 * out.loss).backward()
        return [out.loss, h.grad, w.grad, b.grad]

    ours = run(lambda *a, **k: sf.fused_linear_policy_loss(*a, chunk_size=chunk_size, **k), hidden, weight, bias)
    oracle = run(reference.fused_linear_policy_loss, hidden.double(), weight.double(), bias.double())
    eager = run(reference.fused_linear_policy_loss, hidden, weight, bias)
    for name, o, e, r in zip(["loss", "hidden", "weight", "bias"], ours, eager, oracle):
        assert_spec_close(o, e, r, torch.float32, name)


@pytest.mark.parametrize("bad,match", [
    (torch.ones(3, 5), r"rollout_is_weights must have shape \(3,\), \(3, 1\) or \(3, 6\)"),
    (torch.ones(3, 6, dtype=torch.long), "rollout_is_weights must be a floating-point tensor"),
    (torch.full((3,), -0.5), "rollout_is_weights must be finite and >= 0, found -0.5"),
    (torch.tensor([1.0, float("nan"), 1.0]), "rollout_is_weights must be finite and >= 0, found nan"),
    (torch.tensor([[1.0], [float("inf")], [1.0]]), "rollout_is_weights must be finite and >= 0, found inf"),
    (torch.ones(3, 6, device="meta"), "rollout_is_weights is on meta"),
    ([1.0, 1.0, 1.0], "rollout_is_weights must be a torch.Tensor"),
])
def test_bad_weights_are_rejected_by_every_loss(bad, match):
    batch = make_batch(seed=1)
    config = config_for("dapo")
    args = (batch["old_logp"], batch["advantages"], batch["mask"], config)
    hidden, weight = torch.randn(3, 6, 4), torch.randn(23, 4)
    calls = [
        lambda: sf.policy_loss(batch["old_logp"], *args, rollout_is_weights=bad),
        lambda: sf.fused_policy_loss(batch["logits"], batch["targets"], *args, rollout_is_weights=bad),
        lambda: sf.fused_linear_policy_loss(hidden, weight, batch["targets"], *args, rollout_is_weights=bad),
    ]
    for call in calls:
        with pytest.raises((ValueError, TypeError), match=match):
            call()
