"""Agreement with Liger-Kernel's `LigerFusedLinearGRPOLoss` (issue 2, item 5) for the loss types we
share: grpo, dapo, dr_grpo, at token and sequence (GSPO) level, with and without its k3 KL term.

Liger's fused op is a chunked matmul giving per-token log-probs followed by its `ppo_loss_fn` on
(B, T) tensors. The fused comparisons run the whole op against ours (loss, and gradients wrt hidden,
weight, bias); the pins of semantic differences call `ppo_loss_fn` directly, on chosen log-probs.
Every difference is listed, with the reason we follow docs/api.md, in docs/peer-differences.md.

Liger computes its log-probs in float32 whatever the input dtype, so the fused comparisons are at
float32: Liger and our float32 op are each held to the same distance from our float64 oracle."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

liger_grpo = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")

import sppo_fast  # noqa: E402
from sppo_fast import PolicyLossConfig, reference  # noqa: E402

LigerFusedLinearGRPOLoss = liger_grpo.LigerFusedLinearGRPOLoss
liger_ppo_loss_fn = liger_grpo.LigerFusedLinearGRPOFunction.ppo_loss_fn

B, T, H, V = 4, 7, 16, 37  # a vocabulary that is not a power of two, several chunks of Liger's
MAX_COMPLETION_LENGTH = 11  # Dr. GRPO's constant length, deliberately not T
FP32_TOL = dict(rtol=2e-5, atol=2e-6)  # float32 log-probs and matmuls against the float64 oracle
FP64_TOL = dict(rtol=1e-6, atol=1e-9)  # our loss stage keeps weights and old_logp in float32


# ----------------------------------------------------------------------------------------------------
# The fused op: inputs, the two sides, the mapping of Liger's options onto a PolicyLossConfig


def fused_case(seed, bias=True, temperature=1.0, empty_row=False):
    """hidden (B,T,H), weight (V,H), bias, targets, old_logp near the current log-probs (both clip
    bounds are hit at token level, and at sequence level through a per-sequence offset), advantages
    (B,), a right-padded mask, and ref_logp for the KL term."""
    g = torch.Generator().manual_seed(seed)
    hidden = 0.5 * torch.randn(B, T, H, generator=g)
    weight = 0.5 * torch.randn(V, H, generator=g)
    b = 0.1 * torch.randn(V, generator=g) if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    with torch.no_grad():
        current = reference.linear_logprobs(
            hidden.double(),
            weight.double(),
            targets,
            bias=None if b is None else b.double(),
            temperature=temperature,
        )
    # per-sequence offsets: sequence 0 above the clip band with A > 0, sequence 1 below it with A < 0
    offset = torch.tensor([[0.5], [-0.5], [0.0], [0.05]])
    drift = offset + 0.2 * torch.randn(B, T, generator=g)
    old = (current - drift).float()
    ref = (current - 0.3 * torch.randn(B, T, generator=g)).float()  # |d| < 1.5: k3 below its clamp at 10
    adv = torch.randn(B, generator=g)
    adv[0], adv[1] = adv[0].abs(), -adv[1].abs()
    lengths = torch.tensor([T, T - 2, 3, 0 if empty_row else 1])
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    return dict(hidden=hidden, weight=weight, bias=b, targets=targets, old=old, ref=ref, adv=adv, mask=mask)


def our_config(loss_type, level, eps_low=0.2, eps_high=0.2, beta=0.0):
    """Liger's loss_type names our preset; epsilon_low/high are clip_low/high, beta is kl_coef (k3),
    max_completion_length is max_length_norm."""
    max_length = MAX_COMPLETION_LENGTH if loss_type == "dr_grpo" else None
    return PolicyLossConfig.preset(
        loss_type,
        ratio_level=level,
        clip_low=eps_low,
        clip_high=eps_high,
        kl_coef=beta,
        kl_estimator="k3",
        max_length_norm=max_length,
    )


def leaves(case, dtype):
    params = [case["hidden"], case["weight"]] + ([case["bias"]] if case["bias"] is not None else [])
    return [p.detach().to(dtype).requires_grad_(True) for p in params]


def run_liger(case, loss_type, level, eps_low=0.2, eps_high=0.2, beta=0.0, temperature=1.0, compiled=False):
    """Liger's fused loss: (loss, [grad hidden, grad weight, grad bias], clipfrac, kl or None)."""
    params = leaves(case, torch.float32)
    module = LigerFusedLinearGRPOLoss(
        beta=beta,
        compiled=compiled,
        use_ref_model=beta != 0.0,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        loss_type=loss_type,
        max_completion_length=MAX_COMPLETION_LENGTH,
        importance_sampling_level=level,
        temperature=temperature,
    )
    loss, metrics = module(
        params[0],
        params[1],
        case["targets"],
        case["mask"].float(),
        case["adv"],
        bias=params[2] if len(params) > 2 else None,
        ref_per_token_logps=case["ref"] if beta else None,
        old_per_token_logps=case["old"],
    )
    loss.backward()
    kl = metrics[0] if beta else None
    return loss.detach(), [p.grad for p in params], metrics[-1], kl


def run_ours(case, config, dtype, temperature=1.0, **kwargs):
    """Our fused_linear_policy_loss at `dtype` (float64 is the oracle path)."""
    params = leaves(case, dtype)
    out = sppo_fast.fused_linear_policy_loss(
        params[0],
        params[1],
        case["targets"],
        case["old"],
        case["adv"],
        case["mask"],
        config,
        bias=params[2] if len(params) > 2 else None,
        ref_logp=case["ref"] if config.kl_coef else None,
        temperature=temperature,
        **kwargs,
    )
    out.loss.backward()
    return out, [p.grad for p in params]


def assert_fused_agree(case, loss_type, level, config, **liger_kwargs):
    """Liger and our float32 op each agree with our float64 oracle, in loss, every gradient and the
    clip fraction (and the KL metric with beta > 0)."""
    temperature = liger_kwargs.get("temperature", 1.0)
    loss, grads, clipfrac, kl = run_liger(case, loss_type, level, **liger_kwargs)
    oracle, oracle_grads = run_ours(case, config, torch.float64, temperature=temperature)
    ours, our_grads = run_ours(case, config, torch.float32, temperature=temperature)
    for name, mine, theirs, exact in [("loss", ours.loss, loss, oracle.loss)] + [
        (f"grad {n}", m, t, e)
        for n, m, t, e in zip(("hidden", "weight", "bias"), our_grads, grads, oracle_grads)
    ]:
        torch.testing.assert_close(theirs.double(), exact, **FP32_TOL, msg=f"Liger {name} vs fp64")
        torch.testing.assert_close(mine.double(), exact, **FP32_TOL, msg=f"ours {name} vs fp64")
    torch.testing.assert_close(clipfrac.double(), oracle.metrics["clipfrac"].double(), **FP32_TOL)
    if kl is not None:
        torch.testing.assert_close(kl.double(), oracle.metrics["kl"].double(), **FP32_TOL)
    return oracle


# ----------------------------------------------------------------------------------------------------
# Agreement of the fused op


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type, eps_high", [("grpo", 0.2), ("dapo", 0.28), ("dr_grpo", 0.2)])
def test_fused_loss_and_gradients_agree(loss_type, eps_high, level):
    case = fused_case(1 + len(loss_type) + (level == "sequence"))
    oracle = assert_fused_agree(
        case, loss_type, level, our_config(loss_type, level, 0.2, eps_high), eps_high=eps_high
    )
    assert 0 < oracle.metrics["clipfrac"] < 1  # both branches of the clip were taken


def test_fused_gspo_preset_equals_liger_sequence_level():
    """Our gspo preset is Liger's loss_type='grpo' at sequence level with GSPO's 3e-4 / 4e-4 clip; Liger's
    gradient also flows through the sequence mean (docs/api.md §3.2). Without bias, at temperature 0.7."""
    case = fused_case(11, bias=False, temperature=0.7)
    assert_fused_agree(
        case,
        "grpo",
        "sequence",
        PolicyLossConfig.preset("gspo"),
        eps_low=3e-4,
        eps_high=4e-4,
        temperature=0.7,
    )


@pytest.mark.parametrize("loss_type, level", [("grpo", "token"), ("dapo", "sequence")])
def test_fused_k3_kl_term_agrees_below_the_clamp(loss_type, level):
    """Liger's beta * k3(ref, logp) is our kl_coef * k3 while k3 stays under our clamp at 10."""
    case = fused_case(12)
    assert_fused_agree(case, loss_type, level, our_config(loss_type, level, beta=0.04), beta=0.04)


@pytest.mark.parametrize("loss_type", ["dapo", "dr_grpo"])
def test_fused_empty_sequence_agrees_for_token_normalised_losses(loss_type):
    """A sequence without tokens: DAPO divides by the token count and Dr. GRPO by B * L on both sides."""
    case = fused_case(13, empty_row=True)
    assert_fused_agree(case, loss_type, "token", our_config(loss_type, "token"))


def test_fused_compiled_liger_agrees():
    """Liger's default compiled=True (torch.compile of its loss stage): one case, the compile is slow."""
    case = fused_case(14)
    assert_fused_agree(
        case, "dapo", "token", our_config("dapo", "token", 0.2, 0.28), eps_high=0.28, compiled=True
    )


def test_pin_grpo_divides_by_all_sequences():
    """PINNED: Liger's grpo divides the sum of per-sequence means by B, counting sequences that have no
    token; docs/api.md §3.5 (seq-mean-token-mean) averages over sequences with at least one token. Liger's loss
    (and gradient) = ours * B_nonempty / B, and ours with normalizer=B equals Liger's."""
    case = fused_case(15, empty_row=True)
    nonempty = int(case["mask"].any(-1).sum())
    assert nonempty == B - 1
    loss, grads, _, _ = run_liger(case, "grpo", "token")
    ours, our_grads = run_ours(case, our_config("grpo", "token"), torch.float64)
    torch.testing.assert_close(loss.double(), ours.loss * nonempty / B, **FP32_TOL)
    for theirs, mine in zip(grads, our_grads):
        torch.testing.assert_close(theirs.double(), mine * nonempty / B, **FP32_TOL)
    as_liger, _ = run_ours(case, our_config("grpo", "token"), torch.float64, normalizer=B)
    torch.testing.assert_close(loss.double(), as_liger.loss, **FP32_TOL)


# ----------------------------------------------------------------------------------------------------
# Liger's loss stage on chosen log-probs: agreement on random batches and the pinned differences


def liger_stage(
    logp, old, adv, mask, loss_type, level, eps_low=0.2, eps_high=0.2, beta=0.0, ref=None, delta=None, **extra
):
    """Liger's ppo_loss_fn (the stage after its log-probs): (loss, grad wrt logp, clipfrac)."""
    lp = logp.clone().requires_grad_(True)
    m = mask.to(logp.dtype)
    loss, metrics = liger_ppo_loss_fn(
        lp,
        m,
        adv,
        m,
        ref_per_token_logps=ref,
        old_per_token_logps=old,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        beta=beta,
        loss_type=loss_type,
        max_completion_length=MAX_COMPLETION_LENGTH,
        importance_sampling_level=level,
        delta=delta,
        **extra,
    )
    loss.backward()
    return loss.detach(), lp.grad, metrics[-1]


def our_stage(logp, old, adv, mask, config, **kwargs):
    lp = logp.clone().requires_grad_(True)
    out = sppo_fast.policy_loss(lp, old, adv, mask, config, **kwargs)
    out.loss.backward()
    return out.loss.detach().double(), lp.grad, out.metrics


def stage_inputs(seed, b=B, t=T, empty_row=False):
    """float64 tensors holding float32 values (our loss stage keeps old_logp in float32)."""
    g = torch.Generator().manual_seed(seed)
    old = -3.0 * torch.rand(b, t, generator=g)
    logp = old + 0.15 * torch.randn(b, 1, generator=g) + 0.25 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, generator=g)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    if empty_row:
        mask[-1] = False
    return logp.double(), old.double(), adv.double(), mask


@settings(max_examples=30)
@given(
    seed=st.integers(0, 2**31 - 1),
    b=st.integers(1, 5),
    t=st.integers(1, 10),
    loss_type=st.sampled_from(["grpo", "dapo", "dr_grpo"]),
    level=st.sampled_from(["token", "sequence"]),
    empty_row=st.booleans(),
)
def test_loss_stage_agrees_on_random_batches(seed, b, t, loss_type, level, empty_row):
    """With normalizer=B for grpo (Liger's denominator, see the pin above) the stages agree everywhere,
    fully masked sequences included."""
    logp, old, adv, mask = stage_inputs(seed, b, t, empty_row and b > 1)
    loss, grad, clipfrac = liger_stage(logp, old, adv, mask, loss_type, level)
    kwargs = {"normalizer": b} if loss_type == "grpo" else {}
    ours, our_grad, metrics = our_stage(logp, old, adv, mask, our_config(loss_type, level), **kwargs)
    torch.testing.assert_close(ours, loss, **FP64_TOL)
    torch.testing.assert_close(our_grad, grad, **FP64_TOL)
    torch.testing.assert_close(metrics["clipfrac"].double(), clipfrac, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_dapo_num_items_in_batch_is_our_normalizer(level):
    """Liger's num_items_in_batch (the global token count, TRL's convention) replaces the local token
    count exactly as our `normalizer` does."""
    logp, old, adv, mask = stage_inputs(22, empty_row=True)
    loss, grad, _ = liger_stage(logp, old, adv, mask, "dapo", level, num_items_in_batch=57)
    ours, our_grad, _ = our_stage(logp, old, adv, mask, our_config("dapo", level), normalizer=57)
    torch.testing.assert_close(ours, loss, **FP64_TOL)
    torch.testing.assert_close(our_grad, grad, **FP64_TOL)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_pin_no_log_ratio_clamp_in_liger(level):
    """PINNED: docs/api.md §3.2 clamps every token's log-ratio to [-20, 20]; Liger does not. A sequence whose
    log-ratios are all 25 with A = -1 (the unclipped branch, l = rho): Liger's loss is e^25, ours e^20,
    and our gradient is 0 (the clamp) where Liger's is e^25 / n."""
    old = torch.full((1, 2), -1.0, dtype=torch.float64)
    logp, adv, mask = (
        old + 25.0,
        torch.tensor([-1.0], dtype=torch.float64),
        torch.ones(1, 2, dtype=torch.bool),
    )
    loss, grad, _ = liger_stage(logp, old, adv, mask, "dapo", level)
    ours, our_grad, _ = our_stage(logp, old, adv, mask, our_config("dapo", level))
    torch.testing.assert_close(loss, torch.tensor(math.exp(25.0), dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(ours, torch.tensor(math.exp(20.0), dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(
        grad, torch.full((1, 2), math.exp(25.0) / 2, dtype=torch.float64), rtol=1e-12, atol=0
    )
    assert torch.all(our_grad == 0)


def test_pin_k3_is_unclamped_in_liger():
    """PINNED: docs/api.md §3.4 (and verl's low_var_kl) clamp k3 at 10; Liger's k3 is unclamped. With
    d = ref - logp = 3, Liger's k3 = e^3 - 4 = 16.09 and its gradient e^3 - 1 flows; ours is 10, flat."""
    logp = torch.tensor([[-2.0, -1.0]], dtype=torch.float64)
    ref = logp + torch.tensor([[3.0, 0.5]], dtype=torch.float64)
    adv, mask = torch.zeros(1, dtype=torch.float64), torch.ones(1, 2, dtype=torch.bool)
    beta = 0.1
    loss, grad, _ = liger_stage(logp, logp, adv, mask, "dapo", "token", beta=beta, ref=ref)
    ours, our_grad, metrics = our_stage(
        logp, logp, adv, mask, our_config("dapo", "token", beta=beta), ref_logp=ref
    )
    k3 = [math.exp(3.0) - 4.0, math.exp(0.5) - 1.5]
    torch.testing.assert_close(
        loss, torch.tensor(beta * sum(k3) / 2, dtype=torch.float64), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(ours, torch.tensor(beta * (10.0 + k3[1]) / 2, dtype=torch.float64), **FP64_TOL)
    # d k3 / d logp = 1 - e^d, times beta / N_tok
    dk3 = [beta / 2 * (1 - math.exp(3.0)), beta / 2 * (1 - math.exp(0.5))]
    torch.testing.assert_close(grad, torch.tensor([dk3], dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(our_grad, torch.tensor([[0.0, dk3[1]]], dtype=torch.float64), **FP64_TOL)
    assert metrics["kl"].item() == pytest.approx((10.0 + k3[1]) / 2, rel=1e-6)


def test_delta_equals_dual_clip_when_above_the_clip_band():
    """Liger's delta (INTELLECT-2: clamp rho at delta before the PPO min) is our dual_clip whenever
    delta >= 1 + clip_high: both leave -delta * A on A < 0 tokens with rho > delta, and A > 0 tokens are
    already held at 1 + clip_high. Log-ratios up to 1.5 put rho past 3."""
    logp, old, adv, mask = stage_inputs(21)
    logp = logp + 1.5 * (torch.arange(T) % 2)  # every other token: rho ~ e^1.5 = 4.5
    adv = torch.tensor([-1.0, 0.7, -0.3, 1.2], dtype=torch.float64)
    loss, grad, _ = liger_stage(logp, old, adv, mask, "grpo", "token", delta=3.0)
    ours, our_grad, metrics = our_stage(logp, old, adv, mask, PolicyLossConfig.preset("grpo", dual_clip=3.0))
    assert metrics["dual_clipfrac"] > 0
    torch.testing.assert_close(ours, loss, **FP64_TOL)
    torch.testing.assert_close(our_grad, grad, **FP64_TOL)


def test_pin_delta_below_the_clip_band_also_caps_positive_advantages():
    """PINNED: Liger's delta applies to every token; our dual_clip only to A < 0 (docs/api.md §3.4, dual-clip
    PPO). With delta = dual_clip = 1.1 < 1 + clip_high and rho = 1.5, A = 1: Liger's loss is -1.1, ours
    -1.2 (the PPO clip)."""
    old = torch.full((1, 1), -1.0, dtype=torch.float64)
    logp, adv, mask = (
        old + math.log(1.5),
        torch.ones(1, dtype=torch.float64),
        torch.ones(1, 1, dtype=torch.bool),
    )
    loss, _, _ = liger_stage(logp, old, adv, mask, "grpo", "token", delta=1.1)
    ours, _, _ = our_stage(logp, old, adv, mask, PolicyLossConfig.preset("grpo", dual_clip=1.1))
    torch.testing.assert_close(loss, torch.tensor(-1.1, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(ours, torch.tensor(-1.2, dtype=torch.float64), rtol=1e-6, atol=0)
