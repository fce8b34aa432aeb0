"""Packed (padding-free) batches (issue 9 part 4): the losses with `cu_seqlens` give the same values,
log-probs, entropy, metrics and gradients as the padded (B, T) call on the same sequences, and bad
`cu_seqlens` / `position_ids` get a ValueError naming the argument."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import sppo_fast as sf
from sppo_fast.layout import cu_seqlens_from_position_ids
from sppo_fast.losses import AGGREGATIONS, PRESETS

V, H, BOUNDARY = 11, 8, 0  # token 0 closes an SSPO segment


def make_case(lengths, seed=0, per_sequence_advantage=True, packed_row_segments=True):
    """One set of sequences in both layouts: `padded` (S, T) right-padded, T = the longest sequence
    (the packed layout's own width, so Dr. GRPO's T agrees), and `packed` (N,) rows with cu_seqlens.
    Inside each sequence the first token is masked (a prompt token) and ratios straddle the clips."""
    g = torch.Generator().manual_seed(seed)
    S, T = len(lengths), max(max(lengths, default=0), 1)
    cu = torch.tensor([0] + torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist(), dtype=torch.int32)
    present = torch.arange(T).unsqueeze(0) < torch.tensor(lengths, dtype=torch.long).reshape(S, 1)
    mask = present & (torch.rand(S, T, generator=g) < 0.85)
    targets = torch.randint(0, V, (S, T), generator=g)
    tokens = torch.where(torch.rand(S, T, generator=g) < 0.3, torch.tensor(BOUNDARY), targets)
    old_logp = -2.0 * torch.rand(S, T, generator=g)
    ref_logp = old_logp + 0.2 * torch.randn(S, T, generator=g)
    weights = torch.rand(S, T, generator=g) + 0.5
    adv = torch.randn(S, generator=g)
    adv_tokens = adv.unsqueeze(1) + 0.3 * torch.randn(S, T, generator=g)
    hidden = torch.randn(S, T, H, generator=g)
    logits = 2.0 * torch.randn(S, T, V, generator=g)
    seg = sf.segment_ids(tokens, [BOUNDARY], mask=mask)
    padded = dict(targets=targets, old_logp=old_logp, mask=mask, ref_logp=ref_logp, rollout_is_weights=weights,
                  advantages=adv if per_sequence_advantage else adv_tokens, segment_ids=seg,
                  hidden=hidden, logits=logits)

    def pack(x):
        return x[present]

    packed = {k: pack(v) for k, v in padded.items() if v.dim() >= 2}
    if per_sequence_advantage:
        packed["advantages"] = adv  # (S,): one per packed sequence
    if len(lengths) == sum(lengths):  # an (N,) tensor would read as one per sequence: per-token as (1, N)
        packed["rollout_is_weights"] = packed["rollout_is_weights"].unsqueeze(0)
        if not per_sequence_advantage:
            packed["advantages"] = packed["advantages"].unsqueeze(0)
    if packed_row_segments:  # ids counted over the whole packed row run on across sequences
        packed["segment_ids"] = sf.segment_ids(pack(tokens).unsqueeze(0), [BOUNDARY],
                                               mask=pack(mask).unsqueeze(0))[0]
    return padded, packed, cu, present


def unambiguous(lengths):
    """A per-sequence (S,) tensor is ambiguous when S == N without one token per sequence."""
    return len(lengths) != sum(lengths) or all(n == 1 for n in lengths)


def assert_outputs_match(packed_out, padded_out, present, atol=1e-6, valid=None):
    """`valid` (packed): compare logp and entropy there only, for the linear paths that may leave masked
    rows out (0 there) in one layout and not in the other."""
    torch.testing.assert_close(packed_out.loss, padded_out.loss, rtol=1e-6, atol=atol)
    for name in ("logp", "entropy"):
        mine, other = getattr(packed_out, name), getattr(padded_out, name)[present]
        if valid is not None:
            mine, other = mine[valid], other[valid]
        torch.testing.assert_close(mine, other, rtol=1e-6, atol=atol, msg=name)
    assert packed_out.metrics.keys() == padded_out.metrics.keys()
    for k in padded_out.metrics:
        torch.testing.assert_close(packed_out.metrics[k], padded_out.metrics[k], rtol=1e-6, atol=atol, msg=k)


def loss_kwargs(d, config, use_ref, use_weights):
    kw = dict(segment_ids=d["segment_ids"] if config.needs_segments else None)
    if use_ref:
        kw["ref_logp"] = d["ref_logp"]
    if use_weights:
        kw["rollout_is_weights"] = d["rollout_is_weights"]
    return kw


lengths_strategy = st.lists(st.integers(0, 7), min_size=1, max_size=5)


# ----------------------------------------------------------------------------------------------------
# policy_loss on per-token log-probs (fp64: the packed and padded paths must agree to rounding)


@settings(max_examples=30)
@given(lengths=lengths_strategy, preset=st.sampled_from(sorted(PRESETS)), aggregation=st.sampled_from(AGGREGATIONS),
       seed=st.integers(0, 2**16), per_sequence=st.booleans(), use_ref=st.booleans(), use_weights=st.booleans())
def test_policy_loss_packed_equals_padded(lengths, preset, aggregation, seed, per_sequence, use_ref, use_weights):
    per_sequence = per_sequence and unambiguous(lengths)
    padded, packed, cu, present = make_case(lengths, seed, per_sequence)
    config = sf.PolicyLossConfig.preset(preset, aggregation=aggregation, kl_coef=0.1 if use_ref else 0.0,
                                        entropy_coef=0.01)
    g = torch.Generator().manual_seed(seed + 1)
    logp_padded = (padded["old_logp"] + 0.3 * torch.randn(padded["old_logp"].shape, generator=g)).double()
    entropy_padded = torch.rand(logp_padded.shape, generator=g).double() * 2

    def run(d, logp, entropy, **extra):
        logp = logp.clone().requires_grad_(True)
        entropy = entropy.clone().requires_grad_(True)
        out = sf.policy_loss(logp, d["old_logp"].double(), d["advantages"].double(), d["mask"], config,
                             entropy=entropy, **loss_kwargs(d, config, use_ref, use_weights), **extra)
        out.loss.backward()
        return out, logp.grad, entropy.grad

    ours, g_logp, g_ent = run(packed, logp_padded[present], entropy_padded[present], cu_seqlens=cu)
    theirs, g_logp_pad, g_ent_pad = run(padded, logp_padded, entropy_padded)
    assert_outputs_match(ours, theirs, present, atol=1e-12)
    torch.testing.assert_close(g_logp, g_logp_pad[present], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_ent, g_ent_pad[present], rtol=1e-12, atol=1e-12)


def test_packed_sequences_never_mix():
    """GSPO's sequence ratio: changing one packed sequence's log-probs leaves every other sequence's
    gradient unchanged (a ratio averaged across the boundary would not)."""
    padded, packed, cu, present = make_case([3, 4, 2], seed=3)
    config = sf.PolicyLossConfig.preset("gspo", clip_low=1.0, clip_high=1e9)

    def grad(logp):
        logp = logp.clone().requires_grad_(True)
        sf.policy_loss(logp, packed["old_logp"], packed["advantages"], packed["mask"], config,
                       cu_seqlens=cu).loss.backward()
        return logp.grad

    base = packed["old_logp"] + 0.1
    moved = base.clone()
    moved[3:7] += 0.5  # the second sequence only
    a, b = grad(base), grad(moved)
    outside = torch.ones(9, dtype=torch.bool)
    outside[3:7] = False
    torch.testing.assert_close(a[outside], b[outside], rtol=0, atol=0)
    assert (a[3:7] - b[3:7]).abs().max() > 1e-3


@pytest.mark.parametrize("packed_row_segments", [True, False])
def test_segment_ids_per_sequence_or_over_the_packed_row(packed_row_segments):
    """SSPO segment ids may be counted per sequence or over the whole packed row (then they run past T:
    here up to 11 with T = 3); both give the padded call's loss and gradient."""
    lengths = [3, 3, 1, 3, 2]
    padded, packed, cu, present = make_case(lengths, seed=11, packed_row_segments=packed_row_segments)
    tokens = torch.full((5, 3), BOUNDARY)  # every token closes its segment: one segment per token
    padded["segment_ids"] = sf.segment_ids(tokens, [BOUNDARY], mask=padded["mask"])
    if packed_row_segments:
        packed["segment_ids"] = sf.segment_ids(tokens[present].unsqueeze(0), [BOUNDARY],
                                               mask=packed["mask"].unsqueeze(0))[0]
        assert packed["segment_ids"].max() > 3
    else:
        packed["segment_ids"] = padded["segment_ids"][present]
    config = sf.PolicyLossConfig.preset("sspo")
    g = torch.Generator().manual_seed(0)
    logp = padded["old_logp"] + 0.3 * torch.randn(5, 3, generator=g)
    entropy = 2 * torch.rand(5, 3, generator=g)

    def run(d, logp, entropy, **extra):
        logp = logp.clone().requires_grad_(True)
        out = sf.policy_loss(logp, d["old_logp"], d["advantages"], d["mask"], config, entropy=entropy,
                             segment_ids=d["segment_ids"], **extra)
        out.loss.backward()
        return out.loss, logp.grad

    loss, grad = run(packed, logp[present], entropy[present], cu_seqlens=cu)
    loss_pad, grad_pad = run(padded, logp, entropy)
    torch.testing.assert_close(loss, loss_pad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, grad_pad[present], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------------
# The fused losses: kernels on the packed rows, same numbers as the padded call


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("shape", ["flat", "row"])
def test_fused_policy_loss_packed_equals_padded(preset, shape):
    lengths = [3, 0, 1, 6, 2]
    padded, packed, cu, present = make_case(lengths, seed=5)
    config = sf.PolicyLossConfig.preset(preset, kl_coef=0.05, entropy_coef=0.01)

    def run(d, **extra):
        logits = d["logits"].clone().requires_grad_(True)
        args = [d[k] for k in ("targets", "old_logp", "advantages", "mask")]
        if extra and shape == "row":  # (1, N, V) logits and (1, N) per-token tensors
            logits_in = logits.unsqueeze(0)
            args = [args[0].unsqueeze(0), args[1].unsqueeze(0), args[2], args[3].unsqueeze(0)]
        else:
            logits_in = logits
        out = sf.fused_policy_loss(logits_in, *args, config, **loss_kwargs(d, config, True, True), **extra)
        out.loss.backward()
        return out, logits.grad

    ours, grad = run(packed, cu_seqlens=cu)
    theirs, grad_pad = run(padded)
    if shape == "row":
        assert ours.logp.shape == (1, sum(lengths))
        ours = ours._replace(logp=ours.logp[0], entropy=ours.entropy[0])
    assert_outputs_match(ours, theirs, present)
    torch.testing.assert_close(grad, grad_pad[present], rtol=1e-5, atol=1e-6)


@settings(max_examples=20)
@given(lengths=lengths_strategy, preset=st.sampled_from(sorted(PRESETS)), aggregation=st.sampled_from(AGGREGATIONS),
       seed=st.integers(0, 2**16), chunk_size=st.sampled_from([None, 1, 5, 64]), use_bias=st.booleans())
def test_fused_linear_policy_loss_packed_equals_padded(lengths, preset, aggregation, seed, chunk_size, use_bias):
    """Over lengths with empty and one-token sequences, every preset and aggregation, and chunk sizes that
    take the one-pass sequence chunking (chunk >= T) or the two-pass fallback (chunk < T)."""
    per_sequence = unambiguous(lengths)
    padded, packed, cu, present = make_case(lengths, seed, per_sequence)
    config = sf.PolicyLossConfig.preset(preset, aggregation=aggregation, kl_coef=0.05, entropy_coef=0.01)
    g = torch.Generator().manual_seed(seed)
    weight = (0.5 * torch.randn(V, H, generator=g)).requires_grad_(True)
    bias = (0.1 * torch.randn(V, generator=g)).requires_grad_(True) if use_bias else None

    def run(d, **extra):
        hidden = d["hidden"].clone().requires_grad_(True)
        out = sf.fused_linear_policy_loss(hidden, weight, d["targets"], d["old_logp"], d["advantages"], d["mask"],
                                          config, bias=bias, chunk_size=chunk_size,
                                          **loss_kwargs(d, config, True, True), **extra)
        params = [hidden, weight] + ([bias] if use_bias else [])
        grads = torch.autograd.grad(out.loss, params, allow_unused=True)
        return out, [torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads)]

    ours, grads = run(packed, cu_seqlens=cu)
    theirs, grads_pad = run(padded)
    assert_outputs_match(ours, theirs, present, atol=1e-5, valid=packed["mask"].bool())
    torch.testing.assert_close(grads[0], grads_pad[0][present], rtol=1e-5, atol=1e-6)
    for mine, other in zip(grads[1:], grads_pad[1:]):
        torch.testing.assert_close(mine, other, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", ["sppo", "gspo", "sspo"])
def test_fused_linear_packed_equals_padded_on_every_backend(backend, preset):
    """Packed equals padded on every kernel backend, on each plan: whole sequences (chunk 64), chunks of
    valid tokens or two passes (chunk 2, shorter than most sequences), against the fp64 policy_loss."""
    _, device = backend

    @settings(max_examples=4, deadline=None)
    @given(lengths=st.lists(st.integers(0, 6), min_size=1, max_size=4), seed=st.integers(0, 2**16),
           chunk_size=st.sampled_from([2, 64]))
    def check(lengths, seed, chunk_size):
        padded, packed, cu, present = make_case(lengths, seed, unambiguous(lengths))
        config = sf.PolicyLossConfig.preset(preset, kl_coef=0.05)
        weight = (0.5 * torch.randn(V, H, generator=torch.Generator().manual_seed(seed))).to(device)

        def run(d, **extra):
            d = {k: v.to(device) for k, v in d.items()}
            hidden, w = d["hidden"].clone().requires_grad_(True), weight.clone().requires_grad_(True)
            out = sf.fused_linear_policy_loss(hidden, w, d["targets"], d["old_logp"], d["advantages"], d["mask"],
                                              config, chunk_size=chunk_size, **loss_kwargs(d, config, True, True),
                                              **extra)
            return out, torch.autograd.grad(out.loss, [hidden, w])

        ours, (g_hidden, g_weight) = run(packed, cu_seqlens=cu.to(device))
        theirs, (g_hidden_pad, g_weight_pad) = run(padded)
        assert_outputs_match(ours, theirs, present.to(device), atol=1e-5, valid=packed["mask"].bool().to(device))
        torch.testing.assert_close(g_hidden, g_hidden_pad[present.to(device)], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_weight, g_weight_pad, rtol=1e-5, atol=1e-6)
        p64 = {k: (v.double() if v.is_floating_point() else v) for k, v in packed.items()}
        w64 = weight.cpu().double().requires_grad_(True)
        logprobs = torch.log_softmax(p64["hidden"] @ w64.T, -1)
        logp = logprobs.gather(-1, p64["targets"].unsqueeze(-1)).squeeze(-1)
        ref = sf.policy_loss(logp, p64["old_logp"], p64["advantages"], p64["mask"], config, cu_seqlens=cu,
                             entropy=-(logprobs.exp() * logprobs).sum(-1), **loss_kwargs(p64, config, True, True))
        torch.testing.assert_close(ours.loss.double().cpu(), ref.loss, rtol=1e-5, atol=1e-6)
        if ref.loss.requires_grad:
            torch.testing.assert_close(g_weight.double().cpu(), torch.autograd.grad(ref.loss, w64)[0],
                                       rtol=1e-4, atol=1e-5)

    check()


@pytest.mark.parametrize("preset, mode", [("grpo", "tokens"), ("dapo", "tokens"), ("gspo", "two_pass"),
                                          ("sspo", "two_pass")])
def test_packed_long_sequences_take_the_shared_plan(monkeypatch, preset, mode):
    """Sequences with more valid tokens than a chunk: token-local losses keep the one pass on packed rows
    (chunks of valid tokens cut through sequences), as padded batches do; sequence and segment statistics
    take two passes over the valid rows. The plan holds the valid rows only, and values and gradients
    equal the padded batch's and an fp64 policy_loss's."""
    import sppo_fast.api as api

    plans = []
    real = api.plan_linear_loss
    monkeypatch.setattr(api, "plan_linear_loss", lambda *a, **k: plans.append(real(*a, **k)) or plans[-1])
    lengths = [7, 0, 5, 1, 6]
    padded, packed, cu, present = make_case(lengths, seed=3)
    config = sf.PolicyLossConfig.preset(preset, kl_coef=0.05)
    weight = (0.5 * torch.randn(V, H, generator=torch.Generator().manual_seed(1))).requires_grad_(True)

    def run(d, **extra):
        hidden = d["hidden"].clone().requires_grad_(True)
        out = sf.fused_linear_policy_loss(hidden, weight, d["targets"], d["old_logp"], d["advantages"], d["mask"],
                                          config, chunk_size=3, **loss_kwargs(d, config, True, True), **extra)
        return out, torch.autograd.grad(out.loss, [hidden, weight])

    ours, (grad_hidden, grad_weight) = run(packed, cu_seqlens=cu)
    assert [p.mode for p in plans] == [mode]
    valid_rows = packed["mask"].reshape(-1).bool().nonzero().squeeze(1)
    assert torch.equal(plans[0].rows, valid_rows)
    assert all(len(c.rows) <= 3 for c in plans[0].chunks)
    theirs, (grad_hidden_pad, grad_weight_pad) = run(padded)
    assert_outputs_match(ours, theirs, present, atol=1e-5, valid=packed["mask"].bool())
    torch.testing.assert_close(grad_hidden, grad_hidden_pad[present], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_weight, grad_weight_pad, rtol=1e-5, atol=1e-6)

    w64 = weight.detach().double().requires_grad_(True)
    logprobs64 = torch.log_softmax(packed["hidden"].double() @ w64.T, -1)
    logp64 = logprobs64.gather(-1, packed["targets"].unsqueeze(-1)).squeeze(-1)
    entropy64 = -(logprobs64.exp() * logprobs64).sum(-1)
    ref = sf.policy_loss(logp64, packed["old_logp"].double(), packed["advantages"], packed["mask"], config,
                         cu_seqlens=cu, entropy=entropy64, **loss_kwargs({k: v.double() if v.is_floating_point() else v
                                                       for k, v in packed.items()}, config, True, True))
    torch.testing.assert_close(ours.loss.double(), ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_weight.double(), torch.autograd.grad(ref.loss, w64)[0], rtol=1e-4, atol=1e-5)


def test_fused_linear_packed_row_layout_and_no_grad():
    """(1, N, H) hidden and (1, N) tensors; under no_grad the one pass skips the gradient work."""
    lengths = [4, 1, 0, 3]
    padded, packed, cu, present = make_case(lengths, seed=9)
    weight = torch.randn(V, H)
    config = sf.PolicyLossConfig.preset("sspo")
    with torch.no_grad():
        ours = sf.fused_linear_policy_loss(packed["hidden"].unsqueeze(0), weight, packed["targets"].unsqueeze(0),
                                           packed["old_logp"].unsqueeze(0), packed["advantages"],
                                           packed["mask"].unsqueeze(0), config,
                                           segment_ids=packed["segment_ids"].unsqueeze(0), cu_seqlens=cu)
        theirs = sf.fused_linear_policy_loss(padded["hidden"], weight, padded["targets"], padded["old_logp"],
                                             padded["advantages"], padded["mask"], config,
                                             segment_ids=padded["segment_ids"])
    assert ours.logp.shape == (1, sum(lengths))
    assert_outputs_match(ours._replace(logp=ours.logp[0], entropy=ours.entropy[0]), theirs, present)


def test_packed_batch_without_tokens():
    """cu_seqlens = [0] (no sequence) or [0, 0, 0] (two empty ones): zero loss, empty outputs, no NaN."""
    config = sf.PolicyLossConfig.preset("grpo")
    for cu in (torch.tensor([0]), torch.tensor([0, 0, 0])):
        hidden = torch.zeros(0, H, requires_grad=True)
        empty = torch.zeros(0)
        out = sf.fused_linear_policy_loss(hidden, torch.randn(V, H), torch.zeros(0, dtype=torch.long), empty, empty,
                                          empty.bool(), config, cu_seqlens=cu)
        out.loss.backward()
        assert out.loss.item() == 0.0 and out.logp.shape == (0,)
        assert all(torch.isfinite(m) for m in out.metrics.values())


# ----------------------------------------------------------------------------------------------------
# cu_seqlens and position_ids


def test_cu_seqlens_from_position_ids():
    pos = torch.tensor([0, 1, 2, 0, 0, 1, 2, 3])
    expected = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    assert torch.equal(cu_seqlens_from_position_ids(pos), expected)
    assert torch.equal(cu_seqlens_from_position_ids(pos.unsqueeze(0)), expected)
    assert torch.equal(sf.cu_seqlens_from_position_ids(torch.zeros(0, dtype=torch.long)),
                       torch.tensor([0], dtype=torch.int32))


@pytest.mark.parametrize("pos, match", [
    (torch.tensor([1, 2, 3]), "start at 0"),
    (torch.tensor([0, 1, 3]), "count up by 1"),
    (torch.tensor([0, 1, 1]), "count up by 1"),
    (torch.zeros(2, 3, dtype=torch.long), r"\(N,\) or \(1, N\)"),
])
def test_bad_position_ids(pos, match):
    with pytest.raises(ValueError, match="position_ids.*" + match):
        cu_seqlens_from_position_ids(pos)
    with pytest.raises(TypeError, match="position_ids"):
        cu_seqlens_from_position_ids(pos.float())


BAD_CU = [
    (torch.tensor([1, 3, 5]), "start at 0"),
    (torch.tensor([0, 4, 2, 5]), "non-decreasing"),
    (torch.tensor([0, 2, 4]), "end at"),
    (torch.tensor([0.0, 2.0, 5.0]), "int32 or int64"),
    (torch.tensor([0, 2, 5], dtype=torch.int16), "int32 or int64"),
    (torch.tensor([[0, 5]]), r"\(S \+ 1,\)"),
    ([0, 2, 5], "torch.Tensor"),
]


@pytest.mark.parametrize("cu, match", BAD_CU)
def test_bad_cu_seqlens_names_the_argument(cu, match):
    """Each public loss rejects bad cu_seqlens with a ValueError naming it, before any kernel runs."""
    N = 5
    config = sf.PolicyLossConfig.preset("grpo")
    small = dict(old_logp=torch.zeros(N), advantages=torch.zeros(N), mask=torch.ones(N))
    targets = torch.zeros(N, dtype=torch.long)
    calls = [
        lambda: sf.policy_loss(torch.zeros(N), *small.values(), config, cu_seqlens=cu),
        lambda: sf.fused_policy_loss(torch.zeros(N, V), targets, *small.values(), config, cu_seqlens=cu),
        lambda: sf.fused_linear_policy_loss(torch.zeros(N, H), torch.zeros(V, H), targets, *small.values(), config,
                                            cu_seqlens=cu),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="cu_seqlens.*" + match):
            call()


def test_packed_shapes_name_the_argument():
    cu = torch.tensor([0, 2, 5])
    config = sf.PolicyLossConfig.preset("grpo")
    ok = dict(old_logp=torch.zeros(5), advantages=torch.zeros(2), mask=torch.ones(5))
    with pytest.raises(ValueError, match="old_logp"):
        sf.policy_loss(torch.zeros(5), torch.zeros(4), ok["advantages"], ok["mask"], config, cu_seqlens=cu)
    with pytest.raises(ValueError, match="advantages"):
        sf.policy_loss(torch.zeros(5), ok["old_logp"], torch.zeros(3), ok["mask"], config, cu_seqlens=cu)
    with pytest.raises(ValueError, match="mask"):
        sf.policy_loss(torch.zeros(5), ok["old_logp"], ok["advantages"], torch.ones(2, 5), config, cu_seqlens=cu)
    with pytest.raises(ValueError, match="logits"):
        sf.fused_policy_loss(torch.zeros(2, 5, V), torch.zeros(2, 5, dtype=torch.long), *ok.values(), config,
                             cu_seqlens=cu)
    with pytest.raises(ValueError, match="targets"):
        sf.fused_policy_loss(torch.zeros(5, V), torch.zeros(4, dtype=torch.long), *ok.values(), config,
                             cu_seqlens=cu)
    with pytest.raises(ValueError, match="segment_ids is required"):
        sf.policy_loss(torch.zeros(5), *ok.values(), sf.PolicyLossConfig.preset("sspo"), entropy=torch.zeros(5),
                       cu_seqlens=cu)


def test_ambiguous_per_sequence_advantages():
    """S == N without one token per sequence: a 1-D (S,) tensor could be either; the error says how to
    say which. With one token per sequence both readings agree and it is accepted."""
    config = sf.PolicyLossConfig.preset("grpo")
    with pytest.raises(ValueError, match="advantages.*ambiguous"):
        sf.policy_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.ones(2), config,
                       cu_seqlens=torch.tensor([0, 0, 2]))
    out = sf.policy_loss(torch.zeros(2), torch.zeros(2), torch.ones(2), torch.ones(2), config,
                         cu_seqlens=torch.tensor([0, 1, 2]))
    assert out.loss.item() == pytest.approx(-1.0)
