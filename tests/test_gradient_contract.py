"""docs/api.md §2 and §6: which inputs carry gradient (logits / hidden, weight, bias, logp, entropy) and
which are constants (old_logp, advantages, ref_logp, rollout_is_weights, mask), masked positions that get a
zero gradient whatever they hold, and bad arguments that get an error naming them, never a Python-internal
one."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sppo_fast as sf
from sppo_fast import dispatch

B, T, V, H = 3, 5, 13, 6
CONSTANTS = ("old_logp", "advantages", "ref_logp", "rollout_is_weights")


def batch(seed=0, kl=True):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :2] = False
    mask[2, 3:] = False
    return dict(logits=torch.randn(B, T, V, generator=g), hidden=torch.randn(B, T, H, generator=g),
                weight=0.5 * torch.randn(V, H, generator=g), targets=torch.randint(0, V, (B, T), generator=g),
                old_logp=-torch.rand(B, T, generator=g), advantages=torch.randn(B, generator=g), mask=mask,
                ref_logp=-torch.rand(B, T, generator=g), rollout_is_weights=torch.rand(B, T, generator=g) + 0.5)


def call(op, d, config, **extra):
    kw = dict(ref_logp=d["ref_logp"], rollout_is_weights=d["rollout_is_weights"], **extra)
    args = (d["old_logp"], d["advantages"], d["mask"], config)
    if op == "policy_loss":
        logp, entropy = sf.token_logprobs(d["logits"], d["targets"], return_entropy=True)
        return sf.policy_loss(logp, *args, entropy=entropy, **kw)
    if op == "fused_policy_loss":
        return sf.fused_policy_loss(d["logits"], d["targets"], *args, **kw)
    return sf.fused_linear_policy_loss(d["hidden"], d["weight"], d["targets"], *args, **kw)


@pytest.mark.parametrize("op", ["policy_loss", "fused_policy_loss", "fused_linear_policy_loss"])
@pytest.mark.parametrize("preset", ["sppo", "grpo", "gspo"])
def test_constants_carry_no_gradient(op, preset):
    """A caller who forgets to detach old_logp (or the others) still trains on the documented objective:
    they get no gradient and the gradient of the differentiable inputs is unchanged."""
    config = sf.PolicyLossConfig.preset(preset, kl_coef=0.1)
    d = batch()
    wrt = "hidden" if op == "fused_linear_policy_loss" else "logits"
    plain = dict(d, **{wrt: d[wrt].clone().requires_grad_(True)})
    expected = torch.autograd.grad(call(op, plain, config).loss, plain[wrt])[0]
    leaky = dict(d, **{k: d[k].clone().requires_grad_(True) for k in (*CONSTANTS, wrt)})
    out = call(op, leaky, config)
    grads = torch.autograd.grad(out.loss, [leaky[wrt], *(leaky[k] for k in CONSTANTS)], allow_unused=True)
    torch.testing.assert_close(grads[0], expected)
    assert all(g is None for g in grads[1:]), [k for k, g in zip(CONSTANTS, grads[1:]) if g is not None]


@pytest.mark.parametrize("op", ["policy_loss", "fused_policy_loss"])
def test_constants_carry_no_gradient_packed(op):
    config = sf.PolicyLossConfig.preset("dapo", kl_coef=0.1)
    lengths = [4, 0, 3]
    N = sum(lengths)
    cu = torch.tensor([0, 4, 4, 7], dtype=torch.int32)
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(N, V, generator=g, requires_grad=True)
    consts = {k: (-torch.rand(N, generator=g)).requires_grad_(True) for k in ("old_logp", "ref_logp")}
    adv = torch.randn(3, generator=g, requires_grad=True)
    targets, mask = torch.randint(0, V, (N,), generator=g), torch.ones(N)
    if op == "fused_policy_loss":
        out = sf.fused_policy_loss(logits, targets, consts["old_logp"], adv, mask, config, ref_logp=consts["ref_logp"],
                                   cu_seqlens=cu)
    else:
        logp = sf.token_logprobs(logits, targets)
        out = sf.policy_loss(logp, consts["old_logp"], adv, mask, config, ref_logp=consts["ref_logp"], cu_seqlens=cu)
    grads = torch.autograd.grad(out.loss, [logits, consts["old_logp"], consts["ref_logp"], adv], allow_unused=True)
    assert grads[0] is not None and all(g is None for g in grads[1:])


# ----------------------------------------------------------------------------------------------------
# Masked positions: a zero gradient whatever they hold


@pytest.mark.parametrize("fill", [float("-inf"), float("nan"), float("inf"), 1e30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_masked_logits_rows_get_a_zero_gradient(backend, fill, dtype):
    name, device = backend
    if dtype == torch.float64 and name != "reference":
        pytest.skip("fp64 takes the eager oracle whatever the backend")
    d = batch(seed=1)
    logits = d["logits"].to(device=device, dtype=dtype)
    logits[~d["mask"]] = fill
    logits.requires_grad_(True)
    config = sf.PolicyLossConfig.preset("sspo")
    seg = sf.segment_ids(d["targets"], [0, 1], mask=d["mask"])
    out = sf.fused_policy_loss(logits, d["targets"].to(device), d["old_logp"].to(device),
                               d["advantages"].to(device), d["mask"].to(device), config, segment_ids=seg.to(device))
    assert torch.isfinite(out.loss)
    (grad,) = torch.autograd.grad(out.loss, logits)
    assert torch.isfinite(grad).all()
    assert (grad[~d["mask"].to(device)] == 0).all()
    assert bool(grad[d["mask"].to(device)].abs().sum() > 0)


@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
@pytest.mark.parametrize("preset, chunk_size", [("sppo", None), ("sppo", 2), ("gspo", 2), ("gspo", None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_hidden_rows_get_a_zero_gradient(fill, preset, chunk_size, dtype):
    """Every plan (one pass by sequences or tokens, two passes, the fp64 oracle): masked rows never enter a
    matmul, so NaN or inf there leaves every gradient finite and equal to the clean batch's."""
    d = batch(seed=3)
    config = sf.PolicyLossConfig.preset(preset)

    def grads(hidden_rows_fill):
        hidden = d["hidden"].to(dtype).clone()
        hidden[~d["mask"]] = hidden_rows_fill
        hidden.requires_grad_(True)
        weight = d["weight"].to(dtype).requires_grad_(True)
        out = sf.fused_linear_policy_loss(hidden, weight, d["targets"], d["old_logp"], d["advantages"], d["mask"],
                                          config, chunk_size=chunk_size)
        return (out.loss, *torch.autograd.grad(out.loss, [hidden, weight]))

    loss, g_hidden, g_weight = grads(fill)
    clean = grads(0.0)
    assert torch.isfinite(g_hidden).all() and torch.isfinite(g_weight).all()
    assert (g_hidden[~d["mask"]] == 0).all()
    for mine, theirs in zip((loss, g_hidden, g_weight), clean):
        torch.testing.assert_close(mine, theirs)


def test_masked_hidden_rows_get_a_zero_gradient_when_traced():
    """Under torch.compile the plan keeps every row (no data-dependent row count): masked rows are zeroed."""
    d = batch(seed=4)
    config = sf.PolicyLossConfig.preset("dapo")
    hidden = d["hidden"].clone()
    hidden[~d["mask"]] = float("nan")
    hidden.requires_grad_(True)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def loss(hidden, weight):
        return sf.fused_linear_policy_loss(hidden, weight, d["targets"], d["old_logp"], d["advantages"], d["mask"],
                                           config).loss

    weight = d["weight"].clone().requires_grad_(True)
    g_hidden, g_weight = torch.autograd.grad(loss(hidden, weight), [hidden, weight])
    assert torch.isfinite(g_hidden).all() and torch.isfinite(g_weight).all()
    assert (g_hidden[~d["mask"]] == 0).all()


# ----------------------------------------------------------------------------------------------------
# segment_ids, config fields, normalizer


@pytest.mark.parametrize("bad, error, match", [
    (lambda s: s.masked_fill(s >= 0, T), ValueError, rf"segment_ids must lie in \[0, {T}\).*found {T}"),
    (lambda s: s.masked_fill(s == 0, -3), ValueError, r"segment_ids must lie in \[0, 5\).*found -3"),
    (lambda s: s.float(), TypeError, "segment_ids must be an integer tensor"),
    (lambda s: s[:, :-1], ValueError, r"segment_ids must have shape \(3, 5\)"),
])
@pytest.mark.parametrize("op", ["policy_loss", "fused_policy_loss", "fused_linear_policy_loss"])
def test_bad_segment_ids_are_named(bad, error, match, op):
    d = batch()
    seg = sf.segment_ids(d["targets"], [0, 1, 2], mask=d["mask"])
    config = sf.PolicyLossConfig.preset("sspo")
    with pytest.raises(error, match=match):
        call(op, d, config, segment_ids=bad(seg))


def test_segment_ids_off_the_mask_are_free():
    """Positions with mask 0 may hold any id (segment_ids writes -1 there)."""
    d = batch()
    seg = sf.segment_ids(d["targets"], [0, 1, 2], mask=d["mask"]).masked_fill(~d["mask"], 10 * T)
    out = call("fused_policy_loss", d, sf.PolicyLossConfig.preset("sspo"), segment_ids=seg)
    assert torch.isfinite(out.loss)


NUMBER_FIELDS = ("clip_low", "clip_high", "kl_coef", "entropy_coef", "log_ratio_clamp", "dual_clip", "max_length_norm")


@pytest.mark.parametrize("field", NUMBER_FIELDS)
@pytest.mark.parametrize("value", ["0.2", [0.2], True, torch.tensor(0.2), object()])
def test_config_fields_of_the_wrong_type_are_named(field, value):
    with pytest.raises(TypeError, match=rf"PolicyLossConfig\.{field} must be"):
        sf.PolicyLossConfig(**{field: value})


@pytest.mark.parametrize("field", ["low_threshold", "high_threshold", "alpha", "low_entropy_lower"])
def test_entropy_adaptive_fields_of_the_wrong_type_are_named(field):
    with pytest.raises(TypeError, match=rf"EntropyAdaptiveClip\.{field} must be a real number"):
        sf.EntropyAdaptiveClip(**{field: "0.5"})


@pytest.mark.parametrize("field", ["ratio_level", "aggregation", "kl_estimator", "advantage"])
@pytest.mark.parametrize("value", [["token"], 3, None])
def test_config_choices_of_the_wrong_type_are_named(field, value):
    with pytest.raises(ValueError, match=rf"unknown {field}"):
        sf.PolicyLossConfig(**{field: value})


@pytest.mark.parametrize("normalizer, error, match", [
    (torch.ones(3), ValueError, r"normalizer must be a positive number or a 0-dim tensor.*\(3,\)"),
    ("8", TypeError, "normalizer must be a real number"),
    (torch.tensor(0.0), ValueError, "normalizer must be > 0"),
    (-2, ValueError, "normalizer must be > 0"),
    (float("nan"), ValueError, "normalizer must be > 0"),
])
@pytest.mark.parametrize("op", ["policy_loss", "fused_policy_loss", "fused_linear_policy_loss"])
def test_bad_normalizer_is_named(normalizer, error, match, op):
    with pytest.raises(error, match=match):
        call(op, batch(), sf.PolicyLossConfig.preset("grpo"), normalizer=normalizer)


# ----------------------------------------------------------------------------------------------------
# Every argument of the public API, given the classes of bad input new users give


def _kernels_never_run(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a kernel ran before the argument check")
    monkeypatch.setattr(dispatch, "backend_for", boom)


def _public_calls():
    """name -> (function, positional argument names, keyword arguments), all valid."""
    d = batch()
    cfg = sf.PolicyLossConfig.preset("sspo", kl_coef=0.1)
    seg = sf.segment_ids(d["targets"], [0, 1, 2], mask=d["mask"])
    loss_kw = dict(segment_ids=seg, ref_logp=d["ref_logp"], normalizer=4.0, rollout_is_weights=d["rollout_is_weights"])
    logp, entropy = torch.zeros(B, T), torch.ones(B, T)
    return {
        "token_logprobs": (sf.token_logprobs, dict(logits=d["logits"], targets=d["targets"]),
                           dict(temperature=1.0, ignore_index=-100)),
        "linear_logprobs": (sf.linear_logprobs, dict(hidden=d["hidden"], weight=d["weight"], targets=d["targets"]),
                            dict(temperature=1.0, ignore_index=-100, chunk_size=4, bias=torch.zeros(V))),
        "policy_loss": (sf.policy_loss, dict(logp=logp, old_logp=d["old_logp"], advantages=d["advantages"],
                                             mask=d["mask"], config=cfg), dict(entropy=entropy, **loss_kw)),
        "fused_policy_loss": (sf.fused_policy_loss, dict(logits=d["logits"], targets=d["targets"],
                                                         old_logp=d["old_logp"], advantages=d["advantages"],
                                                         mask=d["mask"], config=cfg),
                              dict(temperature=1.0, **loss_kw)),
        "fused_linear_policy_loss": (sf.fused_linear_policy_loss,
                                     dict(hidden=d["hidden"], weight=d["weight"], targets=d["targets"],
                                          old_logp=d["old_logp"], advantages=d["advantages"], mask=d["mask"],
                                          config=cfg),
                                     dict(temperature=1.0, chunk_size=4, bias=torch.zeros(V), **loss_kw)),
    }


BAD_VALUES = {
    "a string": "abc",
    "a list": [[0.0]],
    "None": None,
    "a complex tensor": torch.zeros(B, T, dtype=torch.complex64),
    "a 0-dim tensor": torch.tensor(1.0),
    "a tensor of the wrong shape": torch.zeros(B + 1, T + 2, 7),
}
OPTIONAL = {"segment_ids", "ref_logp", "normalizer", "rollout_is_weights", "bias", "chunk_size", "entropy"}
INTERNAL = ("object of type", "unsupported operand", "not supported between", "index out of range",
            "has no attribute", "takes from", "argument must be", "unhashable")


def _cases():
    for fn_name, (_, positional, keywords) in _public_calls().items():
        for arg in [*positional, *keywords]:
            for kind in BAD_VALUES:
                if kind == "None" and arg in OPTIONAL:
                    continue
                if kind == "a 0-dim tensor" and arg == "normalizer":
                    continue  # a valid normalizer
                yield fn_name, arg, kind


@pytest.mark.parametrize("fn_name, arg, kind", list(_cases()))
def test_every_argument_names_itself(monkeypatch, fn_name, arg, kind):
    fn, positional, keywords = _public_calls()[fn_name]
    _kernels_never_run(monkeypatch)
    positional, keywords = dict(positional), dict(keywords)
    (positional if arg in positional else keywords)[arg] = BAD_VALUES[kind]
    with pytest.raises((TypeError, ValueError)) as info:
        fn(*positional.values(), **keywords)
    message = str(info.value)
    named = arg if arg != "config" else "config"
    shape_words = ("shape", "must have", "leading shape", "the shape of")
    assert named in message or (kind == "a tensor of the wrong shape" and any(w in message for w in shape_words)), \
        message
    assert not any(s in message for s in INTERNAL), message


@given(temperature=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3), st.text(max_size=3),
                             st.booleans()))
def test_temperature_is_checked_for_every_value(temperature):
    d = batch()
    try:
        ok = math.isfinite(float(temperature)) and float(temperature) > 0 and not isinstance(temperature, bool)
    except (TypeError, ValueError):
        ok = False
    if ok:
        sf.token_logprobs(d["logits"], d["targets"], temperature=temperature)
        return
    with pytest.raises((TypeError, ValueError), match="temperature"):
        sf.token_logprobs(d["logits"], d["targets"], temperature=temperature)
