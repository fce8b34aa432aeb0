"""sppo_fast.integrations.verl against verl 0.9.1's own functions (issue 9 part 3): the registered names
resolve through verl's lookups; the SPPO loss equals verl's vanilla loss, SSPO with one segment per
sequence equals verl's GSPO, the SPPO advantage equals verl's ReMax with baseline sigmoid(z); our
FusedLinearForPPO equals verl's in values and gradients, inside verl's own model forward too."""

import pytest
import torch

pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not installed (CI installs it with --no-deps)")

from rank_pool import spawn_ranks  # noqa: E402
from spec_helpers import assert_spec_close  # noqa: E402
from test_peers_verl import LOSS_TOL, NO_DUAL_CLIP, actor_config, loss_inputs, run_verl  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.utils.experimental import torch_functional  # noqa: E402

import sppo_fast as sf  # noqa: E402
from sppo_fast.integrations import verl as sf_verl  # noqa: E402

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@pytest.fixture(scope="module", autouse=True)
def registered():
    return sf_verl.register()


def test_register_resolves_through_verl_and_is_idempotent(registered):
    assert sf_verl.register() == registered  # a second call changes nothing and does not raise
    assert core_algos.get_policy_loss_fn("sppo_fast_sppo") is sf_verl.sppo_policy_loss
    assert core_algos.get_policy_loss_fn("sppo_fast_sspo") is sf_verl.sspo_policy_loss
    assert core_algos.get_adv_estimator_fn("sppo_fast_sppo") is sf_verl.compute_sppo_advantage
    # verl's own entries are untouched and none of its names is ours
    assert core_algos.get_policy_loss_fn("vanilla") is core_algos.compute_policy_loss_vanilla
    assert core_algos.get_adv_estimator_fn("grpo") is core_algos.compute_grpo_outcome_advantage
    assert "sppo_fast_sppo" not in {e.value for e in core_algos.AdvantageEstimator}


def test_register_refuses_to_overwrite_a_foreign_loss():
    core_algos.POLICY_LOSS_REGISTRY["sppo_fast_sspo"] = core_algos.compute_policy_loss_vanilla
    try:
        with pytest.raises(ValueError, match="sppo_fast_sspo"):
            sf_verl.register()
    finally:
        core_algos.POLICY_LOSS_REGISTRY["sppo_fast_sspo"] = sf_verl.sspo_policy_loss


# ----------------------------------------------------------------------------------------------------
# Policy losses, called the way verl's ppo_loss calls them


def call_registered(name, logp, old, adv, mask, mode, config, **kwargs):
    lp = logp.clone().requires_grad_(True)
    adv = adv if adv.dim() == 2 else adv.unsqueeze(1).expand_as(lp)
    loss, metrics = core_algos.get_policy_loss_fn(name)(old_log_prob=old, log_prob=lp, advantages=adv,
                                                        response_mask=mask, loss_agg_mode=mode, config=config,
                                                        **kwargs)
    loss.backward()
    return loss.detach().double(), lp.grad, metrics


def assert_verl_metrics(ours, theirs, names=("pg_clipfrac", "pg_clipfrac_lower")):
    for name in names:
        assert ours["actor/" + name] == pytest.approx(theirs["actor/" + name], rel=1e-6, abs=1e-7), name


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("data_parallel", [False, True])
@pytest.mark.parametrize("is_weights", [False, True])
def test_sppo_loss_equals_verl_vanilla(mode, data_parallel, is_weights):
    """Same loss and gradient as verl's vanilla loss (dual clip at clip_ratio_c) for every loss_agg_mode,
    with and without verl's global batch info and rollout IS weights (an empty sequence included:
    for seq-mean-token-sum-norm our mapping counts the non-empty sequences, as verl does)."""
    logp, old, adv, mask = loss_inputs(60)
    info = {}
    if data_parallel:
        info = dict(dp_size=4, batch_num_tokens=90, global_batch_size=20, loss_scale_factor=32)
    config = actor_config(0.2, 0.28, 3.0, global_batch_info=info)
    kwargs = {}
    if is_weights:
        kwargs["rollout_is_weights"] = torch.rand(logp.shape, generator=torch.Generator().manual_seed(1)).double()
    loss, grad, metrics = call_registered("sppo_fast_sppo", logp, old, adv, mask, mode, config, **kwargs)
    lp = logp.clone().requires_grad_(True)
    vloss, vmetrics = core_algos.compute_policy_loss_vanilla(old, lp, adv, mask.double(), loss_agg_mode=mode,
                                                             config=config, **kwargs)
    vloss.backward()
    torch.testing.assert_close(loss, vloss.detach(), **LOSS_TOL)
    torch.testing.assert_close(grad, lp.grad, **LOSS_TOL)
    assert_verl_metrics(metrics, vmetrics)
    assert metrics["actor/pg_clipfrac_lower"] > 0  # the dual clip was exercised


@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum"])
def test_sspo_with_one_segment_per_sequence_equals_verl_gspo(mode):
    """One segment per sequence and entropies inside the default band (0.5 <= H <= 1): SSPO's segment ratio
    is GSPO's sequence ratio with fixed bounds; with per-sequence advantages the gradients agree too."""
    logp, old, adv, mask = loss_inputs(61)
    adv = adv[:, 0]
    segments = torch.where(mask, torch.zeros_like(mask, dtype=torch.long), torch.full_like(mask, -1, dtype=torch.long))
    entropy = torch.full(logp.shape, 0.75, dtype=torch.float64)
    config = actor_config(0.05, 0.05, NO_DUAL_CLIP)  # tight bounds: some sequences clip, some do not
    loss, grad, metrics = call_registered("sppo_fast_sspo", logp, old, adv, mask, mode, config,
                                          segment_ids=segments, entropy=entropy)
    vloss, vgrad, vmetrics = run_verl(core_algos.compute_policy_loss_gspo, logp, old, adv, mask, mode, config)
    torch.testing.assert_close(loss, vloss, **LOSS_TOL)
    torch.testing.assert_close(grad, vgrad, **LOSS_TOL)
    assert_verl_metrics(metrics, vmetrics, names=("pg_clipfrac",))
    assert grad.abs().sum() > 0 and 0 < metrics["actor/pg_clipfrac"] < 1


def sspo_case(seed=62):
    logp, old, adv, mask = loss_inputs(seed)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 4, mask.shape, generator=g)
    segments = sf.segment_ids(tokens, [0], mask=mask)
    entropy = (2.0 * torch.rand(mask.shape, generator=g)).double()  # all three entropy bands
    return logp, old, adv, mask, segments, entropy


def test_sspo_loss_is_our_sspo_preset_on_verl_inputs():
    """Several segments per sequence, entropy-adaptive bounds active: the registered loss is our SSPO
    preset with verl's clip ratios and aggregation (through the keywords or the loss_inputs context)."""
    logp, old, adv, mask, segments, entropy = sspo_case()
    assert segments.max() >= 2
    config = actor_config(0.3, 0.3, 3.0)
    loss, grad, _ = call_registered("sppo_fast_sspo", logp, old, adv, mask, "seq-mean-token-mean", config,
                                    segment_ids=segments, entropy=entropy)
    with sf_verl.loss_inputs(segment_ids=segments, entropy=entropy):
        loss_ctx, grad_ctx, _ = call_registered("sppo_fast_sspo", logp, old, adv, mask, "seq-mean-token-mean",
                                                config)
    lp = logp.clone().requires_grad_(True)
    ours = sf.policy_loss(lp, old, adv, mask, sf.PolicyLossConfig.preset("sspo"), segment_ids=segments,
                          entropy=entropy)
    ours.loss.backward()
    for value, gradient in ((loss, grad), (loss_ctx, grad_ctx)):
        torch.testing.assert_close(value, ours.loss.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gradient, lp.grad, rtol=1e-12, atol=1e-12)
    # the adaptive bounds matter here: fixed 0.3 bounds give another loss
    fixed = sf.policy_loss(logp, old, adv, mask, sf.PolicyLossConfig.preset("sspo", entropy_adaptive=None),
                           segment_ids=segments)
    assert abs(fixed.loss.item() - loss.item()) > 1e-4


def test_sspo_loss_without_segments_or_entropy_says_how_to_pass_them():
    logp, old, adv, mask, segments, entropy = sspo_case()
    fn = core_algos.get_policy_loss_fn("sppo_fast_sspo")
    config = actor_config(0.3, 0.3)
    with pytest.raises(ValueError, match="segment_ids"):
        fn(old, logp, adv, mask, "token-mean", config)
    with pytest.raises(ValueError, match="entropy"):
        fn(old, logp, adv, mask, "token-mean", config, segment_ids=segments)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        fn(old, logp, adv, mask, "seq-sum", config, segment_ids=segments, entropy=entropy)
    with pytest.raises(ValueError, match="batch_num_tokens"):
        core_algos.get_policy_loss_fn("sppo_fast_sppo")(old, logp, adv, mask, "token-mean",
                                                        actor_config(global_batch_info={"dp_size": 2}))


# ----------------------------------------------------------------------------------------------------
# The SPPO advantage estimator


def test_sppo_advantage_equals_remax_with_sigmoid_baseline():
    """verl's ReMax advantage with baseline b is (reverse-cumsum of rewards) - b; with the outcome reward on
    the last valid token that is R - b on the mask. SPPO is that with b = sigmoid(critic logit)."""
    g = torch.Generator().manual_seed(70)
    B, T = 6, 7
    lengths = torch.tensor([7, 3, 1, 5, 7, 2])
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).float()
    scores = (torch.rand(B, generator=g) < 0.5).float()
    token_rewards = torch.zeros(B, T)
    token_rewards[torch.arange(B), lengths - 1] = scores
    z = 2.0 * torch.randn(B, generator=g)
    fn = core_algos.get_adv_estimator_fn("sppo_fast_sppo")
    # the keywords verl's compute_advantage passes for a registered estimator
    adv, returns = fn(token_level_rewards=token_rewards, response_mask=mask, config=None,
                      index=list(range(B)), reward_baselines=z)
    remax_adv, remax_returns = core_algos.compute_remax_outcome_advantage(token_rewards, torch.sigmoid(z), mask)
    torch.testing.assert_close(adv, remax_adv, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(returns, remax_returns, rtol=0, atol=0)
    torch.testing.assert_close(adv, sf.sequence_advantage(scores, z).unsqueeze(1) * mask)
    direct, _ = fn(token_rewards, mask, critic_logits=z)
    torch.testing.assert_close(direct, adv, rtol=0, atol=0)
    with pytest.raises(ValueError, match="reward_baselines"):
        fn(token_level_rewards=token_rewards, response_mask=mask)


# ----------------------------------------------------------------------------------------------------
# FusedLinearForPPO


def head_inputs(shape, dtype, seed=80, V=301, H=24):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=g).to(dtype)
    weight = (0.5 * torch.randn(V, H, generator=g)).to(dtype)
    ids = torch.randint(0, V, shape, generator=g)
    w_logp, w_ent = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return hidden, weight, ids, w_logp, w_ent


def run_head(module, hidden, weight, ids, w_logp, w_ent, temperature, use_entropy=True):
    hidden = hidden.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    logp, entropy = module(hidden, weight, ids, temperature=temperature)
    loss = (logp * w_logp).sum() + ((entropy.float() * w_ent).sum() if use_entropy else 0.0)
    loss.backward()
    return logp, entropy, hidden.grad, weight.grad


@pytest.mark.parametrize("shape", [(37,), (3, 13)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_entropy", [True, False])
def test_fused_linear_for_ppo_matches_verl(shape, dtype, use_entropy):
    """Outputs (dtype and shape) and gradients of verl's torch implementation, to docs/api.md §5: our error against
    fp64 at most verl's own (same dtype) plus the tolerance."""
    inputs = head_inputs(shape, dtype)
    ours = run_head(sf_verl.FusedLinearForPPO(chunk_size=8), *inputs, 0.7, use_entropy)
    theirs = run_head(torch_functional.FusedLinearForPPO(chunk_size=8), *inputs, 0.7, use_entropy)
    h, w, ids, wl, we = inputs
    oracle = run_head(torch_functional.FusedLinearForPPO(chunk_size=8), h.double(), w.double(), ids, wl.double(),
                      we.double(), 0.7, use_entropy)
    for name, mine, other, exact in zip(("logp", "entropy", "grad hidden", "grad weight"), ours, theirs, oracle):
        assert mine.dtype == other.dtype and mine.shape == other.shape, name
        assert_spec_close(mine, other, exact, dtype, name)


def test_patched_head_inside_verl_model_forward():
    """verl's own model forward for use_fused_kernels (dense_common.forward_with_torch_backend) on a tiny
    Llama: with the patch it runs our head and gives verl's log-probs, entropy and parameter gradients."""
    transformers = pytest.importorskip("transformers")
    from verl.models.transformers.dense_common import forward_with_torch_backend

    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    input_ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))

    def run():
        model.zero_grad()
        out = forward_with_torch_backend(model, input_ids=input_ids, return_dict=True, temperature=0.9)
        (out.log_probs.sum() + 0.5 * out.entropy.sum()).backward()
        return out.log_probs.detach(), out.entropy.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    verl_logp, verl_entropy, verl_grads = run()
    original = sf_verl.patch_fused_linear_for_ppo()
    try:
        assert torch_functional.FusedLinearForPPO is sf_verl.FusedLinearForPPO
        assert sf_verl.patch_fused_linear_for_ppo() is original  # idempotent
        logp, entropy, grads = run()
    finally:
        sf_verl.unpatch_fused_linear_for_ppo()
    assert torch_functional.FusedLinearForPPO is original
    torch.testing.assert_close(logp, verl_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, verl_entropy, rtol=1e-5, atol=1e-5)
    for name, grad in verl_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# --- Megatron's vocabulary-parallel log-probs and entropy, on 2 gloo ranks --------------------------------


def _megatron_tp_worker(rank, port):
    """verl's vocab_parallel_log_probs_from_logits / vocab_parallel_entropy (megatron's TP group of 2 ranks,
    initialised on CPU with gloo) against our stand-ins: with the group given, and defaulting to megatron's.
    verl's entropy runs a `torch.compile`d helper in its forward; Inductor on CPU compiles it in ~20 s, so
    Dynamo is disabled here: the helper then runs eagerly, the same arithmetic."""
    import datetime
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    torch._dynamo.config.disable = True
    from megatron.core import parallel_state as mpu
    from verl.utils.megatron import tensor_parallel as verl_tp

    mpu.initialize_model_parallel(tensor_model_parallel_size=2)
    group = mpu.get_tensor_model_parallel_group()
    gen = torch.Generator().manual_seed(0)
    V, P = 22, 2
    logits = torch.randn(3, 5, V, generator=gen) * 3
    labels = torch.randint(0, V, (3, 5), generator=gen)
    g_logp, g_ent = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    mine = logits[..., rank * V // P:(rank + 1) * V // P]

    def run(logp_fn, entropy_fn):
        a, b = mine.clone().requires_grad_(), mine.clone().requires_grad_()
        logp, entropy = logp_fn(a, labels), entropy_fn(b)
        (logp * g_logp).sum().backward()
        (entropy * g_ent).sum().backward()
        return logp, entropy, a.grad, b.grad

    theirs = run(verl_tp.vocab_parallel_log_probs_from_logits, verl_tp.vocab_parallel_entropy)
    for kwargs in ({"process_group": group}, {}):
        ours = run(lambda x, y, kw=kwargs: sf_verl.vocab_parallel_log_probs_from_logits(x, y, **kw),
                   lambda x, kw=kwargs: sf_verl.vocab_parallel_entropy(x, **kw))
        for name, a, b in zip(("logp", "entropy", "logp grad", "entropy grad"), ours, theirs):
            assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    full = torch.log_softmax(logits, -1)
    torch.testing.assert_close(ours[0], full.gather(-1, labels[..., None])[..., 0], rtol=1e-5, atol=1e-5)
    dist.barrier()
    mpu.destroy_model_parallel()
    dist.destroy_process_group()


def test_megatron_vocab_parallel_stand_ins_equal_verls():
    pytest.importorskip("megatron.core.parallel_state", reason="megatron-core is not installed")
    spawn_ranks(_megatron_tp_worker, 2)


def test_megatron_stand_ins_need_a_group_without_megatron_state():
    """Outside megatron's initialised state (and with no process group given) the stand-ins say what is missing."""
    logits, labels = torch.randn(2, 3, 8), torch.randint(0, 8, (2, 3))
    with pytest.raises(ValueError, match="process_group is required"):
        sf_verl.vocab_parallel_log_probs_from_logits(logits, labels)
    with pytest.raises(ValueError, match="process_group is required"):
        sf_verl.vocab_parallel_entropy(logits)
