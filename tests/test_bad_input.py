"""docs/api.md §6: every bad input gets a clear error naming the argument, before any kernel runs."""

import pytest
import torch

import sppo_fast as sf
from sppo_fast import dispatch

B, T, V, H = 2, 3, 11, 4


@pytest.fixture
def no_kernel(monkeypatch):
    """Fails the test if any backend kernel is reached: errors must come first."""
    def boom(*args, **kwargs):
        raise AssertionError("a kernel ran before the argument check")
    monkeypatch.setattr(dispatch, "backend_for", boom)


def good():
    return dict(logits=torch.randn(B, T, V), targets=torch.randint(0, V, (B, T)), old_logp=torch.zeros(B, T),
                advantages=torch.zeros(B), mask=torch.ones(B, T), config=sf.PolicyLossConfig.preset("grpo"))


def fused(**overrides):
    a = {**good(), **overrides}
    kw = {k: a.pop(k) for k in list(a) if k in ("segment_ids", "ref_logp", "temperature", "normalizer")}
    return sf.fused_policy_loss(a["logits"], a["targets"], a["old_logp"], a["advantages"], a["mask"],
                                a["config"], **kw)


CASES = [
    ("targets", TypeError, dict(targets=torch.zeros(B, T))),
    ("logits", TypeError, dict(logits=torch.zeros(B, T, V, dtype=torch.long))),
    ("targets", ValueError, dict(targets=torch.zeros(B, T + 1, dtype=torch.long))),
    ("targets", ValueError, dict(targets=torch.full((B, T), V))),
    ("targets", ValueError, dict(targets=torch.full((B, T), -5))),
    ("old_logp", ValueError, dict(old_logp=torch.zeros(B, T + 1))),
    ("mask", ValueError, dict(mask=torch.ones(B + 1, T))),
    ("advantages", ValueError, dict(advantages=torch.zeros(B + 1))),
    ("segment_ids", ValueError, dict(config=sf.PolicyLossConfig.preset("sspo"))),
    ("segment_ids", TypeError, dict(config=sf.PolicyLossConfig.preset("sspo"), segment_ids=torch.zeros(B, T))),
    ("temperature", ValueError, dict(temperature=0.0)),
    ("temperature", ValueError, dict(temperature=-1.0)),
    ("config", TypeError, dict(config="grpo")),
    ("ref_logp", ValueError, dict(config=sf.PolicyLossConfig.preset("grpo", kl_coef=0.1))),
    ("normalizer", ValueError, dict(normalizer=0)),
    ("logits", ValueError, dict(logits=torch.randn(B * T, V))),
]


@pytest.mark.parametrize("name,error,overrides", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_fused_policy_loss_rejects(no_kernel, name, error, overrides):
    with pytest.raises(error, match=name):
        fused(**overrides)


def test_devices_must_match(no_kernel):
    meta = torch.zeros(B, T, device="meta")
    with pytest.raises(ValueError, match="device"):
        fused(old_logp=meta)


def test_token_logprobs_rejects(no_kernel):
    logits, targets = torch.randn(4, V), torch.randint(0, V, (4,))
    with pytest.raises(TypeError, match="logits"):
        sf.token_logprobs(logits.long(), targets)
    with pytest.raises(TypeError, match="targets"):
        sf.token_logprobs(logits, targets.float())
    with pytest.raises(ValueError, match="targets"):
        sf.token_logprobs(logits, targets[:3])
    with pytest.raises(ValueError, match="targets"):
        sf.token_logprobs(logits, torch.tensor([0, 1, 2, V]))
    with pytest.raises(ValueError, match="temperature"):
        sf.token_logprobs(logits, targets, temperature=0)
    with pytest.raises(TypeError, match="ignore_index"):
        sf.token_logprobs(logits, targets, ignore_index=1.5)


def test_ignore_index_is_not_out_of_range():
    logp = sf.token_logprobs(torch.randn(3, V), torch.tensor([0, -100, 5]))
    assert logp[1] == 0


def test_linear_logprobs_rejects(no_kernel):
    hidden, weight, targets = torch.randn(B, T, H), torch.randn(V, H), torch.randint(0, V, (B, T))
    with pytest.raises(ValueError, match="hidden"):
        sf.linear_logprobs(torch.randn(B, T, H + 1), weight, targets)
    with pytest.raises(ValueError, match="weight"):
        sf.linear_logprobs(hidden, torch.randn(V, H, 1), targets)
    with pytest.raises(ValueError, match="bias"):
        sf.linear_logprobs(hidden, weight, targets, bias=torch.randn(V + 1))
    with pytest.raises(TypeError, match="weight"):
        sf.linear_logprobs(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="targets"):
        sf.linear_logprobs(hidden, weight, torch.full((B, T), V))
    with pytest.raises(ValueError, match="chunk_size"):
        sf.linear_logprobs(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match="hidden"):
        sf.fused_linear_policy_loss(hidden.reshape(-1, H), weight, targets.reshape(-1), torch.zeros(B * T),
                                    torch.zeros(B * T), torch.ones(B * T), sf.PolicyLossConfig.preset("grpo"))


def test_unknown_names():
    with pytest.raises(ValueError, match="preset"):
        sf.PolicyLossConfig.preset("ppo2")
    with pytest.raises(ValueError, match="aggregation"):
        sf.PolicyLossConfig(aggregation="mean")
    with pytest.raises(ValueError, match="kl_estimator"):
        sf.PolicyLossConfig(kl_estimator="k4")
    with pytest.raises(ValueError, match="ratio_level"):
        sf.PolicyLossConfig(ratio_level="sentence")
    with pytest.raises(ValueError, match="field"):
        sf.PolicyLossConfig.preset("grpo", clip=0.3)
    with pytest.raises(ValueError, match="dual_clip"):
        sf.PolicyLossConfig(dual_clip=0.5)
    with pytest.raises(ValueError, match="backend"):
        with dispatch.use_backend("cuda"):
            pass


def test_entropy_needed_for_entropy_terms():
    logp = torch.zeros(B, T)
    with pytest.raises(ValueError, match="entropy"):
        sf.policy_loss(logp, logp, torch.zeros(B), torch.ones(B, T),
                       sf.PolicyLossConfig.preset("grpo", entropy_coef=0.1))


def test_advantage_inputs():
    with pytest.raises(ValueError, match="SPPO"):
        sf.group_advantage(torch.ones(4), 1)
    with pytest.raises(ValueError, match="SPPO"):
        sf.rloo_advantage(torch.ones(4), 1)
    with pytest.raises(ValueError, match="group_size"):
        sf.group_advantage(torch.ones(5), 2)
    with pytest.raises(ValueError, match="scale"):
        sf.group_advantage(torch.ones(4), 2, scale="mad")
    with pytest.raises(ValueError, match="critic_logits"):
        sf.sequence_advantage(torch.ones(4), torch.zeros(3))
    with pytest.raises(ValueError, match="rewards"):
        sf.value_bce_loss(torch.zeros(3), torch.ones(3, 1))
    with pytest.raises(ValueError, match="values"):
        sf.gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="lam"):
        sf.gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), lam=2.0)


def test_segment_inputs():
    with pytest.raises(TypeError, match="tokens"):
        sf.segment_ids(torch.zeros(2, 3), [1])
    with pytest.raises(ValueError, match="mask"):
        sf.segment_ids(torch.zeros(2, 3, dtype=torch.long), [1], mask=torch.ones(2, 4))
    with pytest.raises(TypeError, match="boundary_ids"):
        sf.segment_ids(torch.zeros(2, 3, dtype=torch.long), ["a"])
    with pytest.raises(TypeError, match="tokenizer"):
        sf.newline_token_ids(object())


def test_forced_backend_that_cannot_serve(monkeypatch):
    monkeypatch.setenv("SPPO_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SPPO_FAST_BACKEND"):
        sf.token_logprobs(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))
