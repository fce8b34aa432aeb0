"""Agreement with verl's `verl.trainer.ppo.core_algos` (issue 2, item 5): the clipped policy loss with
its dual clip, GSPO, the `agg_loss` modes, the KL estimators, and the GRPO / RLOO / GAE advantages.

Where verl's semantics differ from docs/api.md the test pins the difference as an exact relation; each one
is listed, with the reason we follow docs/api.md, in docs/peer-differences.md.

Inputs are drawn in float32 and compared in float64: the loss stage keeps `old_logp`, `advantages` and the
aggregation weights in float32 (docs/api.md §3: fp32 accumulation), so fp32-exact inputs make the remaining
difference the rounding of the weights (~1e-7 relative)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
verl_config = pytest.importorskip("verl.workers.config")

import sppo_fast  # noqa: E402
from sppo_fast import PolicyLossConfig  # noqa: E402

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
NO_DUAL_CLIP = 1e30  # verl always applies its dual clip; a huge clip_ratio_c switches it off
LOSS_TOL = dict(rtol=1e-6, atol=1e-9)  # fp32 aggregation weights against verl's fp64
METRIC_TOL = dict(rtol=1e-6, atol=1e-7)  # our metrics are fp32


# ----------------------------------------------------------------------------------------------------
# Inputs and the two sides of every comparison


def loss_inputs(seed, B=6, T=9, empty_row=True):
    """(logp, old_logp, advantages (B, T), mask) in float64 holding float32 values. Ratios straddle both
    clip bounds and a few exceed 3 (verl's dual clip); the mask has right padding, a hole in the middle
    of a sequence and, with `empty_row`, one sequence without any token."""
    g = torch.Generator().manual_seed(seed)
    old = -3.0 * torch.rand(B, T, generator=g)
    log_ratio = 0.4 * torch.randn(B, T, generator=g)
    log_ratio[torch.rand(B, T, generator=g) < 0.15] = 1.3  # rho = 3.7: past the dual clip
    logp = old + log_ratio
    adv = torch.randn(B, T, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    mask[0, :] = True
    if T >= 3:
        mask[0, T // 2] = False  # a hole: an observation token inside a response
    if empty_row:
        mask[-1, :] = False
    return tuple(x.double() for x in (logp, old, adv)) + (mask,)


def actor_config(clip_low=0.2, clip_high=0.2, clip_c=3.0, global_batch_info=None):
    """The minimal verl ActorConfig its policy losses read."""
    return verl_config.ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        use_dynamic_bsz=True,
        clip_ratio=clip_low,
        clip_ratio_low=clip_low,
        clip_ratio_high=clip_high,
        clip_ratio_c=clip_c,
        global_batch_info=global_batch_info or {},
    )


def run_ours(logp, old, adv, mask, config, **kwargs):
    """policy_loss with the gradient of the loss wrt logp."""
    lp = logp.clone().requires_grad_(True)
    out = sppo_fast.policy_loss(lp, old, adv, mask, config, **kwargs)
    out.loss.backward()
    return out, lp.grad


def run_verl(loss_fn, logp, old, adv, mask, mode, config):
    """A verl policy loss with the gradient wrt log_prob; advantages broadcast to (B, T) as verl needs."""
    lp = logp.clone().requires_grad_(True)
    adv = adv if adv.dim() == 2 else adv.unsqueeze(1).expand_as(lp)
    loss, metrics = loss_fn(old, lp, adv, mask.double(), loss_agg_mode=mode, config=config)
    loss.backward()
    return loss.detach(), lp.grad, metrics


def assert_metrics_match(ours, verl_metrics):
    """verl's pg_clipfrac, pg_clipfrac_lower, ppo_kl are our clipfrac, dual_clipfrac, approx_kl."""
    for mine, theirs in (
        ("clipfrac", "pg_clipfrac"),
        ("dual_clipfrac", "pg_clipfrac_lower"),
        ("approx_kl", "ppo_kl"),
    ):
        torch.testing.assert_close(
            ours.metrics[mine].double(),
            torch.tensor(verl_metrics["actor/" + theirs], dtype=torch.float64),
            **METRIC_TOL,
            msg=f"{mine} vs verl {theirs}",
        )


def assert_vanilla_agrees(logp, old, adv, mask, config, clip_c, mode=None, clip_high=None, metrics=True):
    """Our policy_loss and verl's compute_policy_loss_vanilla: same loss and gradient (and the clip
    metrics unless metrics=False); returns ours and verl's metrics for further checks."""
    ours, grad = run_ours(logp, old, adv, mask, config)
    actor = actor_config(config.clip_low, config.clip_high if clip_high is None else clip_high, clip_c)
    loss, vgrad, verl_metrics = run_verl(core_algos.compute_policy_loss_vanilla, logp, old, adv, mask,
                                         mode or config.aggregation, actor)
    torch.testing.assert_close(ours.loss.double(), loss, **LOSS_TOL)
    torch.testing.assert_close(grad, vgrad, **LOSS_TOL)
    if metrics:
        assert_metrics_match(ours, verl_metrics)
    return ours, verl_metrics


# ----------------------------------------------------------------------------------------------------
# The vanilla clipped loss (PPO with dual clip, GRPO, DAPO)


@pytest.mark.parametrize("seed", [0, 1])
def test_vanilla_dual_clip_equals_ppo_preset(seed):
    logp, old, adv, mask = loss_inputs(seed)
    ours, _ = assert_vanilla_agrees(logp, old, adv, mask, PolicyLossConfig.preset("ppo"), 3.0)
    assert ours.metrics["dual_clipfrac"] > 0 and ours.metrics["clipfrac"] > 0  # both branches were hit


@pytest.mark.parametrize(
    "preset, clip_high", [("grpo", 0.2), ("dapo", 0.28), ("dr_grpo", 0.2), ("rloo", 0.2)]
)
def test_vanilla_without_dual_clip_equals_presets(preset, clip_high):
    """Our GRPO-family presets have no dual clip: verl agrees once its clip_ratio_c is out of reach.
    (dr_grpo is compared without an empty sequence: see the pin on seq-mean-token-sum-norm.)"""
    config = PolicyLossConfig.preset(preset)
    logp, old, adv, mask = loss_inputs(3, empty_row=preset != "dr_grpo")
    assert_vanilla_agrees(logp, old, adv, mask, config, NO_DUAL_CLIP, clip_high=clip_high)


def test_pin_verl_vanilla_always_dual_clips():
    """PINNED: verl's vanilla loss applies the dual clip (clip_ratio_c = 3.0 by default) to every
    algorithm; our grpo/dapo presets have none (docs/api.md §4). On exactly the tokens with A < 0 and a loss
    above -3 A, verl's per-token loss is -3 A where ours is the clipped-PPO value; `dual_clip=3.0` on our
    side restores agreement."""
    logp, old, adv, mask = loss_inputs(4, empty_row=False)
    dapo = PolicyLossConfig.preset("dapo")
    ours, _ = run_ours(logp, old, adv, mask, dapo)
    verl_default, _, _ = run_verl(
        core_algos.compute_policy_loss_vanilla, logp, old, adv, mask, "token-mean", actor_config(0.2, 0.28)
    )  # verl's defaults: clip_ratio_c = 3.0
    rho = torch.exp(logp - old)
    per_token = torch.maximum(-adv * rho, -adv * rho.clamp(0.8, 1.28))
    capped = (adv < 0) & (per_token > -3.0 * adv) & mask
    assert capped.any()
    gap = ((per_token - (-3.0 * adv)) * capped).sum() / mask.sum()  # what verl's dual clip removes
    torch.testing.assert_close(ours.loss.double() - verl_default, gap, **LOSS_TOL)
    with_dual, _ = run_ours(logp, old, adv, mask, PolicyLossConfig.preset("dapo", dual_clip=3.0))
    torch.testing.assert_close(with_dual.loss.double(), verl_default, **LOSS_TOL)


def test_extreme_log_ratios_clamp_alike_but_ppo_kl_metric_differs():
    """Both clamp the log-ratio to [-20, 20] before exp, so the losses agree at |log-ratio| = 30.
    PINNED: verl's ppo_kl metric averages the clamped log-ratio; our approx_kl averages the raw
    old_logp - logp (docs/api.md §3.6)."""
    logp, old, adv, mask = loss_inputs(5, empty_row=False)
    logp[0, 0], logp[0, 1] = old[0, 0] + 30.0, old[0, 1] - 25.0
    adv[0, 0] = -1.0
    for clip_c, config in (
        (3.0, PolicyLossConfig.preset("ppo")),
        (NO_DUAL_CLIP, PolicyLossConfig.preset("grpo", aggregation="token-mean")),
    ):
        ours, metrics = assert_vanilla_agrees(logp, old, adv, mask, config, clip_c, mode="token-mean",
                                              clip_high=0.2, metrics=False)
        n = mask.sum()
        raw = ((old - logp) * mask).sum() / n
        clamped = ((old - logp).clamp(-20, 20) * mask).sum() / n
        torch.testing.assert_close(ours.metrics["approx_kl"].double(), raw, **METRIC_TOL)
        assert math.isclose(metrics["actor/ppo_kl"], clamped.item(), rel_tol=1e-7, abs_tol=1e-9)
        # the clamp moved -30 to -20 and +25 to +20: verl's metric is 5 / n above ours
        torch.testing.assert_close(clamped - raw, 5.0 / n.double(), rtol=1e-9, atol=0)
    assert ours.metrics["ratio_max"] == pytest.approx(math.exp(20.0), rel=1e-6)


@settings(max_examples=25)
@given(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 5),
    T=st.integers(1, 12),
    preset=st.sampled_from(["ppo", "grpo", "dapo", "rloo"]),
    per_sequence_advantage=st.booleans(),
)
def test_vanilla_agrees_on_random_batches(seed, B, T, preset, per_sequence_advantage):
    config = PolicyLossConfig.preset(preset)
    logp, old, adv, mask = loss_inputs(seed, B=B, T=T, empty_row=B > 1)
    if per_sequence_advantage:
        adv = adv[:, 0]
    assert_vanilla_agrees(logp, old, adv, mask, config, config.dual_clip or NO_DUAL_CLIP)


# ----------------------------------------------------------------------------------------------------
# GSPO


def gspo_inputs(seed, B=5, T=8):
    """GSPO-sized log-ratios (|r| ~ 1e-3) so some sequences fall inside the 3e-4 / 4e-4 clip and some out."""
    logp, old, adv, mask = loss_inputs(seed, B=B, T=T, empty_row=True)
    g = torch.Generator().manual_seed(seed + 100)
    logp = (old.float() + 1e-3 * torch.randn(B, T, generator=g)).double()
    logp[1] = old[1] + 1e-5  # inside the clip band: this sequence has a gradient
    logp[2] = old[2] - 2e-5
    return logp, old, adv, mask


@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("clips", [(3e-4, 4e-4), (0.2, 0.2)])
def test_gspo_equals_ours_for_sequence_advantages(mode, clips):
    """verl's token ratio sg[s_i] * pi_t / sg[pi_t] has the value of the sequence ratio, and, with one
    advantage per sequence and weights uniform within a sequence (every aggregation here), the same
    gradient as ours, where d rho / d logp_t = rho / n_b: the 1/n_b is undone by summing the sequence's
    identical per-token losses."""
    logp, old, adv, mask = gspo_inputs(7)
    config = PolicyLossConfig.preset("gspo", clip_low=clips[0], clip_high=clips[1], aggregation=mode)
    adv = adv[:, 0]
    ours, grad = run_ours(logp, old, adv, mask, config)
    loss, vgrad, metrics = run_verl(
        core_algos.compute_policy_loss_gspo, logp, old, adv, mask, mode, actor_config(*clips)
    )
    torch.testing.assert_close(ours.loss.double(), loss, **LOSS_TOL)
    torch.testing.assert_close(grad, vgrad, **LOSS_TOL)
    assert grad.abs().sum() > 0
    assert_metrics_match(ours, metrics)


def test_pin_gspo_gradient_with_token_advantages():
    """PINNED: with advantages that vary inside a sequence, verl's stop-gradient form gives token t the
    gradient w_b * dl_t/drho * rho_b (its own advantage only); ours (docs/api.md §3.2: gradients flow through
    the mean into every logp) gives every token of the sequence the mean of those: ours_t =
    mean over the sequence's tokens of verl's. Values, and the sum of each sequence's gradient, agree."""
    logp, old, adv, mask = gspo_inputs(8)
    config = PolicyLossConfig.preset("gspo", clip_low=0.2, clip_high=0.2)
    ours, grad = run_ours(logp, old, adv, mask, config)
    loss, vgrad, _ = run_verl(
        core_algos.compute_policy_loss_gspo,
        logp,
        old,
        adv,
        mask,
        "seq-mean-token-mean",
        actor_config(0.2, 0.2),
    )
    torch.testing.assert_close(ours.loss.double(), loss, **LOSS_TOL)
    n_b = mask.sum(-1, keepdim=True).clamp(min=1)
    verl_sequence_mean = (vgrad * mask).sum(-1, keepdim=True) / n_b * mask
    torch.testing.assert_close(grad, verl_sequence_mean, **LOSS_TOL)
    assert (grad - vgrad).abs().max() > 1e-3  # the per-token gradients really differ


def test_pin_gspo_log_ratio_clamps():
    """PINNED: verl clamps the sequence log-ratio at max 10 (its gradient is then 0) and does not clamp
    the per-token log-ratios; ours clamps each token's log-ratio to [-20, 20] before the mean and does
    not clamp the mean (docs/api.md §3.2)."""
    B, T = 2, 2
    old = torch.full((B, T), -1.0, dtype=torch.float64)
    logp = old + torch.tensor([[12.0, 12.0], [30.0, -20.0]], dtype=torch.float64)
    adv = torch.tensor([-1.0, -1.0], dtype=torch.float64)  # A < 0: the unclipped branch, l = rho
    mask = torch.ones(B, T, dtype=torch.bool)
    config = PolicyLossConfig.preset("gspo", aggregation="seq-mean-token-sum")
    ours, grad = run_ours(logp, old, adv, mask, config)
    loss, vgrad, _ = run_verl(
        core_algos.compute_policy_loss_gspo,
        logp,
        old,
        adv,
        mask,
        "seq-mean-token-sum",
        actor_config(3e-4, 4e-4),
    )
    # per sequence, token-sum of l = 2 rho; seq-mean over 2 sequences
    ours_rho = (math.exp(12.0), math.exp((20.0 - 20.0) / 2))
    verl_rho = (math.exp(10.0), math.exp(5.0))  # exp(min(12, 10)) and exp(min((30 - 20) / 2, 10))
    torch.testing.assert_close(
        ours.loss.double(), torch.tensor(sum(ours_rho), dtype=torch.float64), **LOSS_TOL
    )
    torch.testing.assert_close(loss, torch.tensor(sum(verl_rho), dtype=torch.float64), **LOSS_TOL)
    # verl: the clamp at 10 stops row 0's gradient; row 1 (unclamped) gets rho_1 / 2 on each token
    torch.testing.assert_close(
        vgrad, torch.tensor([[0.0, 0.0], [verl_rho[1] / 2] * 2], dtype=torch.float64), **LOSS_TOL
    )
    # ours: d/dlogp_t of (sum_b 2 rho_b) / 2 = rho_b / n_b, except where the token clamp at 20 bites
    expected = torch.tensor([[ours_rho[0] / 2] * 2, [0.0, ours_rho[1] / 2]], dtype=torch.float64)
    torch.testing.assert_close(grad, expected, **LOSS_TOL)


# ----------------------------------------------------------------------------------------------------
# Aggregation (agg_loss)


def aggregation_case(seed, empty_row=True):
    """logp == old_logp makes rho = 1 inside every clip band, so our per-token loss is exactly -A and
    policy_loss returns the aggregation of -A."""
    logp, _, adv, mask = loss_inputs(seed, empty_row=empty_row)
    return logp, adv, mask


def ours_aggregate(logp, adv, mask, mode, **kwargs):
    overrides = {k: kwargs.pop(k) for k in ("max_length_norm",) if k in kwargs}
    config = PolicyLossConfig.preset("grpo", aggregation=mode, **overrides)
    return sppo_fast.policy_loss(logp, logp, adv, mask, config, **kwargs).loss.double()


def verl_aggregate(adv, mask, mode, **kwargs):
    return core_algos.agg_loss(-adv, mask.double(), mode, **kwargs)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_agg_loss_modes_match_with_an_empty_sequence(mode):
    logp, adv, mask = aggregation_case(10)
    torch.testing.assert_close(
        ours_aggregate(logp, adv, mask, mode), verl_aggregate(adv, mask, mode), **LOSS_TOL
    )


def test_agg_loss_token_sum_norm_matches_without_empty_sequences():
    logp, adv, mask = aggregation_case(11, empty_row=False)
    mode = "seq-mean-token-sum-norm"
    torch.testing.assert_close(
        ours_aggregate(logp, adv, mask, mode), verl_aggregate(adv, mask, mode), **LOSS_TOL
    )
    torch.testing.assert_close(
        ours_aggregate(logp, adv, mask, mode, max_length_norm=64),
        verl_aggregate(adv, mask, mode, loss_scale_factor=64),
        **LOSS_TOL,
    )


def test_pin_token_sum_norm_counts_empty_sequences():
    """PINNED: for seq-mean-token-sum-norm (Dr. GRPO) verl divides by the number of sequences that have a
    token; docs/api.md §3.5 divides by B, all sequences (a constant, as Dr. GRPO wants; Liger's dr_grpo does the
    same). verl's loss = ours * B / B_nonempty."""
    logp, adv, mask = aggregation_case(12)
    B, nonempty = mask.shape[0], int(mask.any(-1).sum())
    assert nonempty < B
    mode = "seq-mean-token-sum-norm"
    torch.testing.assert_close(
        verl_aggregate(adv, mask, mode), ours_aggregate(logp, adv, mask, mode) * B / nonempty, **LOSS_TOL
    )


@pytest.mark.parametrize("mode", AGG_MODES)
def test_agg_loss_data_parallel_arguments_map_to_normalizer(mode):
    """verl divides by the global count and multiplies by dp_size (DDP averages gradients over ranks);
    our `normalizer` replaces the local denominator, so verl(count=G, dp_size=D) == ours(normalizer=G/D).
    The Dr. GRPO length maps loss_scale_factor -> max_length_norm."""
    logp, adv, mask = aggregation_case(13)
    dp_size, global_count, length = 4, 90, 32
    if mode == "token-mean":
        theirs = verl_aggregate(adv, mask, mode, dp_size=dp_size, batch_num_tokens=global_count)
    else:
        theirs = verl_aggregate(
            adv, mask, mode, dp_size=dp_size, global_batch_size=global_count, loss_scale_factor=length
        )
    extra = {"max_length_norm": length} if mode == "seq-mean-token-sum-norm" else {}
    ours = ours_aggregate(logp, adv, mask, mode, normalizer=global_count / dp_size, **extra)
    torch.testing.assert_close(ours, theirs, **LOSS_TOL)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_pin_no_valid_token_verl_nan_ours_zero(mode):
    """PINNED: with no valid token verl's agg_loss is 0/0 = NaN; docs/api.md §3.5 gives loss 0, zero gradient."""
    logp, adv, mask = aggregation_case(14)
    mask = torch.zeros_like(mask)
    assert torch.isnan(verl_aggregate(adv, mask, mode))
    lp = logp.clone().requires_grad_(True)
    out = sppo_fast.policy_loss(lp, lp.detach(), adv, mask, PolicyLossConfig.preset("grpo", aggregation=mode))
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.all(lp.grad == 0)


def test_pin_token_sum_mode_is_token_mean_times_count():
    """PINNED: verl has a 'token-sum' mode; docs/api.md §3.5 does not (ValueError). It equals our token-mean times
    the valid-token count, or token-mean with normalizer=1."""
    logp, adv, mask = aggregation_case(15)
    with pytest.raises(ValueError, match="aggregation"):
        PolicyLossConfig(aggregation="token-sum")
    theirs = verl_aggregate(adv, mask, "token-sum")
    torch.testing.assert_close(theirs, ours_aggregate(logp, adv, mask, "token-mean") * mask.sum(), **LOSS_TOL)
    torch.testing.assert_close(
        theirs, ours_aggregate(logp, adv, mask, "token-mean", normalizer=1.0), **LOSS_TOL
    )


# ----------------------------------------------------------------------------------------------------
# KL to the reference policy


@pytest.mark.parametrize("ours_name, verl_name", [("k1", "k1"), ("k2", "k2"), ("k3", "low_var_kl")])
def test_kl_penalty_in_the_loss_matches_verl_actor(ours_name, verl_name):
    """verl's actor adds kl_loss_coef * agg_loss(kl_penalty(logp, ref)) to the policy loss; ours adds
    kl_coef * KL_t to each token's loss before the (linear) aggregation: the same number and gradient.
    The k3 draw includes d = ref - logp > 2.5, where both clamp k3 at 10."""
    logp, old, adv, mask = loss_inputs(16)
    g = torch.Generator().manual_seed(17)
    ref = logp + (0.8 * torch.randn(logp.shape, generator=g)).double()
    ref[0, 0] = logp[0, 0] + 3.0  # k3 = e^3 - 4 = 16.1: clamped to 10 on both sides
    coef = 0.05
    config = PolicyLossConfig.preset("grpo", kl_coef=coef, kl_estimator=ours_name)
    ours, grad = run_ours(logp, old, adv, mask, config, ref_logp=ref)
    lp = logp.clone().requires_grad_(True)
    pg, _ = core_algos.compute_policy_loss_vanilla(
        old, lp, adv, mask.double(), "seq-mean-token-mean", actor_config(0.2, 0.2, NO_DUAL_CLIP)
    )
    kl = core_algos.kl_penalty(lp, ref, verl_name)
    total = pg + coef * core_algos.agg_loss(kl, mask.double(), "seq-mean-token-mean")
    total.backward()
    torch.testing.assert_close(ours.loss.double(), total.detach(), **LOSS_TOL)
    torch.testing.assert_close(grad, lp.grad, **LOSS_TOL)
    torch.testing.assert_close(
        ours.metrics["kl"].double(), (kl.detach() * mask).sum() / mask.sum(), **METRIC_TOL
    )


def test_pin_k1_k2_clamp_the_log_ratio():
    """PINNED: our k1/k2 use d = clamp(ref - logp, -20, 20) (docs/api.md §3.4); verl's k1/k2 do not clamp."""
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    ref = logp + torch.tensor([[25.0, 1.0]], dtype=torch.float64)
    mask = torch.ones_like(logp, dtype=torch.bool)
    zero = torch.zeros(1, dtype=torch.float64)
    for name, ours_kl, verl_kl in (("k1", [-20.0, -1.0], [-25.0, -1.0]), ("k2", [200.0, 0.5], [312.5, 0.5])):
        out = sppo_fast.policy_loss(logp, logp, zero, mask, PolicyLossConfig(kl_estimator=name), ref_logp=ref)
        assert out.metrics["kl"].item() == pytest.approx(sum(ours_kl) / 2)
        assert core_algos.kl_penalty(logp, ref, name).tolist() == [verl_kl]


# ----------------------------------------------------------------------------------------------------
# Advantages


def outcome_rewards(seed, n_groups, group_size, T=5):
    """Binary and real rewards, one per sequence, placed on the last valid token as verl expects; one
    group has all-equal rewards (std = 0)."""
    g = torch.Generator().manual_seed(seed)
    B = n_groups * group_size
    scores = torch.randn(B, generator=g).double()
    scores[:group_size] = (torch.rand(group_size, generator=g) < 0.5).double()
    scores[group_size : 2 * group_size] = 1.0
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).double()
    token_rewards = torch.zeros(B, T, dtype=torch.float64)
    token_rewards[torch.arange(B), lengths - 1] = scores
    index = np.repeat(np.arange(n_groups), group_size)
    return scores, token_rewards, mask, index


@pytest.mark.parametrize("group_size", [2, 4, 5])
@pytest.mark.parametrize("eps", [1e-6, 1e-2])
@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_advantage_matches(group_size, eps, norm_by_std):
    """Same unbiased std, same eps added to the std; verl broadcasts over the response mask."""
    scores, token_rewards, mask, index = outcome_rewards(20 + group_size, 4, group_size)
    theirs, _ = core_algos.compute_grpo_outcome_advantage(
        token_rewards, mask, index, epsilon=eps, norm_adv_by_std_in_grpo=norm_by_std
    )
    scale = "std" if norm_by_std else "none"
    ours = sppo_fast.group_advantage(scores, group_size, scale=scale, eps=eps)
    torch.testing.assert_close(ours.unsqueeze(1) * mask, theirs, rtol=1e-12, atol=1e-12)


def test_grpo_std_is_unbiased_on_both_sides():
    """The estimator itself, by hand: rewards (0, 1) give std = sqrt(1/2) (unbiased), not 1/2."""
    scores = torch.tensor([0.0, 1.0], dtype=torch.float64)
    expected = torch.tensor([-0.5, 0.5], dtype=torch.float64) / (math.sqrt(0.5) + 1e-6)
    theirs, _ = core_algos.compute_grpo_outcome_advantage(
        scores.unsqueeze(1), torch.ones(2, 1), np.array([0, 0])
    )
    torch.testing.assert_close(theirs.squeeze(1), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(sppo_fast.group_advantage(scores, 2), expected, rtol=1e-12, atol=0)


def test_grpo_verl_index_order_is_a_permutation_of_consecutive_groups():
    """verl groups by an index array in any order; ours takes consecutive groups. Sorting by index maps
    one onto the other."""
    scores, token_rewards, mask, index = outcome_rewards(30, 3, 4)
    perm = torch.randperm(len(scores), generator=torch.Generator().manual_seed(31))
    theirs, _ = core_algos.compute_grpo_outcome_advantage(
        token_rewards[perm], mask[perm], index[perm.numpy()]
    )
    ours = sppo_fast.group_advantage(scores, 4)
    torch.testing.assert_close(ours[perm].unsqueeze(1) * mask[perm], theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("group_size", [2, 3, 6])
def test_rloo_advantage_matches(group_size):
    scores, token_rewards, mask, index = outcome_rewards(40 + group_size, 3, group_size)
    theirs, _ = core_algos.compute_rloo_outcome_advantage(token_rewards, mask, index)
    ours = sppo_fast.rloo_advantage(scores, group_size)
    torch.testing.assert_close(ours.unsqueeze(1) * mask, theirs, rtol=1e-12, atol=1e-12)


def test_pin_group_of_one():
    """PINNED: a group of one sample. verl falls back to mean 0, std 1 (GRPO: A = R / (1 + eps)) and to
    A = R (RLOO); docs/api.md §3.7 raises a ValueError that points to SPPO, whose critic is the baseline a
    single sample needs."""
    scores = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    rewards, mask, index = scores.unsqueeze(1), torch.ones(3, 1), np.arange(3)
    grpo, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, index)
    rloo, _ = core_algos.compute_rloo_outcome_advantage(rewards, mask, index)
    # verl builds its fallback std as a float32 tensor: 1 + 1e-6 rounds to float32
    torch.testing.assert_close(grpo.squeeze(1), scores / (1 + 1e-6), rtol=1e-7, atol=0)
    torch.testing.assert_close(rloo.squeeze(1), scores, rtol=0, atol=0)
    for fn in (lambda: sppo_fast.group_advantage(scores, 1), lambda: sppo_fast.rloo_advantage(scores, 1)):
        with pytest.raises(ValueError, match="SPPO|sequence_advantage"):
            fn()


def gae_inputs(seed, B=4, T=10):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g).double()
    values = torch.randn(B, T, generator=g).double()
    lengths = torch.tensor([T, T - 3, 4, 1])[:B]
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    mask[0, 2:5] = False  # observation tokens inside a response: skipped
    return rewards, values, mask


def masked_whiten(x, mask):
    """(x - mean) / sqrt(var + 1e-8) over the mask with the unbiased variance: verl's whitening."""
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = (((x - mean) ** 2) * mask).sum() / n * n / (n - 1)
    return (x - mean) / torch.sqrt(var + 1e-8)


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
def test_pin_gae_verl_whitens(gamma, lam):
    """Returns agree on the mask. PINNED: verl whitens the advantages over the batch's valid tokens
    (unbiased variance, + 1e-8) and leaves non-zero values off the mask; our `gae` returns the raw
    estimate, 0 off the mask (whitening is a trainer choice). verl's advantages = whiten(ours) on the
    mask, and verl's returns - values = ours on the mask."""
    rewards, values, mask = gae_inputs(50)
    theirs_adv, theirs_ret = core_algos.compute_gae_advantage_return(
        rewards, values, mask.double(), gamma, lam
    )
    ours_adv, ours_ret = sppo_fast.gae(rewards, values, mask, gamma=gamma, lam=lam)
    ours_adv, ours_ret = ours_adv.double(), ours_ret.double()
    tol = dict(rtol=1e-5, atol=1e-5)  # our gae accumulates in fp32 (docs/api.md §3)
    torch.testing.assert_close(ours_ret[mask], theirs_ret[mask], **tol)
    torch.testing.assert_close(ours_adv[mask], (theirs_ret - values)[mask], **tol)
    torch.testing.assert_close(masked_whiten(ours_adv, mask)[mask], theirs_adv[mask], **tol)
    assert torch.all(ours_adv[~mask] == 0) and theirs_adv[~mask].abs().max() > 0.1
