"""Vocabulary- and context-parallel calls (docs/api.md §10) on 2 and 4 gloo ranks of this CPU: every value
and gradient of the split call equals the unsplit one (fp64: to 1e-10; fp32 and bf16: its error against
the fp64 oracle at most the unsplit call's plus 1e-5 or 1e-2, as §5 asks of every kernel), and a bad
argument on any rank raises on every rank, never a hang (tests/rank_pool.py)."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rank_pool import RankPool

TOL = {"fp64": 1e-10, "fp32": 1e-5, "bf16": 1e-2}
PRESETS = ["ppo", "grpo", "dapo", "dr_grpo", "rloo", "gspo", "sspo", "sppo"]
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def two():
    pool = RankPool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def four():
    pool = RankPool(4)
    yield pool
    pool.close()


def _sizes(draw, V, P):
    """Uneven shard sizes adding up to V, each at least 1."""
    cuts = sorted(draw(st.lists(st.integers(1, V - 1), min_size=P - 1, max_size=P - 1, unique=True)))
    edges = [0, *cuts, V]
    return [b - a for a, b in zip(edges, edges[1:])]


@st.composite
def vocab_specs(draw, P, ops=("linear", "logits", "linear_logprobs", "token_logprobs")):
    V = draw(st.integers(P, 40))
    return dict(seed=draw(st.integers(0, 2**16)), B=draw(st.integers(1, 3)), T=draw(st.integers(1, 6)),
                H=draw(st.sampled_from([4, 8])), V=V, sizes=_sizes(draw, V, P), op=draw(st.sampled_from(ops)),
                preset=draw(st.sampled_from(PRESETS)), dtype=draw(st.sampled_from(["fp32", "fp64", "bf16"])),
                chunk=draw(st.sampled_from([None, 2])), bias=draw(st.booleans()),
                masked=draw(st.sampled_from([0.0, 0.3, 1.0])), all_masked_row=draw(st.booleans()),
                temperature=draw(st.sampled_from([1.0, 0.7])), give_start=draw(st.booleans()),
                entropy_coef=draw(st.sampled_from([0.0, 0.01])), scale=draw(st.sampled_from([1.0, 30.0])),
                inplace=draw(st.booleans()))


def _check_vocab(results, spec):
    tol = TOL[spec["dtype"]]
    for rank, errors in enumerate(results):
        for name, (split, whole) in errors.items():
            assert split <= whole + tol, f"rank {rank} {name}: split error {split:.3g} > unsplit {whole:.3g} + {tol}"


@SETTINGS
@given(spec=vocab_specs(2))
def test_vocab_parallel_equals_unsplit_on_two_ranks(two, spec):
    _check_vocab(two.values("vocab_case", spec), spec)


@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=vocab_specs(4, ops=("linear", "logits")))
def test_vocab_parallel_equals_unsplit_on_four_ranks(four, spec):
    _check_vocab(four.values("vocab_case", spec), spec)


@pytest.mark.parametrize("preset", PRESETS)
def test_vocab_parallel_every_preset_long_sequences(two, preset):
    """Sequences longer than a chunk (the two-pass and token plans), huge logits, bf16 and fp32."""
    for dtype in ("fp32", "bf16"):
        spec = dict(seed=7, B=2, T=9, H=8, V=37, sizes=[20, 17], op="linear", preset=preset, dtype=dtype,
                    chunk=3, scale=100.0)
        _check_vocab(two.values("vocab_case", spec), spec)


@pytest.mark.parametrize("op", ["linear", "logits"])
def test_vocab_parallel_dtensor(two, op):
    """A DTensor sharded on the vocabulary dim (torch.chunk sizes: 19 + 18) needs no process_group."""
    spec = dict(seed=5, B=2, T=5, H=8, V=37, sizes=[19, 18], op=op, preset="dapo", dtype="fp32", dtensor=True)
    _check_vocab(two.values("vocab_case", spec), spec)


@st.composite
def context_specs(draw, P, two_d=False):
    B, T = draw(st.integers(1, 3)), draw(st.integers(P, 9))
    spec = dict(seed=draw(st.integers(0, 2**16)), B=B, T=T, H=8, V=draw(st.integers(4, 23)),
                op=draw(st.sampled_from(["linear", "logits", "policy_loss"])), preset=draw(st.sampled_from(PRESETS)),
                dtype=draw(st.sampled_from(["fp32", "fp64"])), chunk=draw(st.sampled_from([None, 2])),
                masked=draw(st.sampled_from([0.0, 0.3])), two_d=two_d)
    if draw(st.booleans()):  # packed: sequence s split into P parts (some empty), lengths up to T
        spec["parts"] = [draw(st.lists(st.integers(0, T // P), min_size=P, max_size=P)) for _ in range(B)]
    else:
        cuts = sorted(draw(st.lists(st.integers(1, T - 1), min_size=P - 1, max_size=P - 1, unique=True)))
        edges = [0, *cuts, T]
        spec["widths"] = [b - a for a, b in zip(edges, edges[1:])]
    if two_d:
        spec["sizes"] = _sizes(draw, spec["V"], 2)
    return spec


def _check_context(results, spec):
    tol = {"fp64": 1e-10, "fp32": 1e-5}[spec["dtype"]]
    for rank, errors in enumerate(results):
        for name, error in errors.items():
            assert error <= tol, f"rank {rank} {name}: split differs from unsplit by {error:.3g}"


@SETTINGS
@given(spec=context_specs(2))
def test_context_parallel_equals_unsplit_on_two_ranks(two, spec):
    _check_context(two.values("context_case", spec), spec)


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=context_specs(2, two_d=True))
def test_context_and_vocab_parallel_on_a_2x2_mesh(four, spec):
    _check_context(four.values("context_case", spec), spec)


@pytest.mark.parametrize("kind, failing, text", [
    ("overlap", None, "must tile [0, V) in rank order"),
    ("start_on_one_rank", None, "vocab_start is given on some ranks"),
    ("target_out", None, "targets must lie in [0, 11)"),
    ("mask_shape", 1, "mask must have shape"),
    ("hidden_differs", None, "differ from rank 0's"),
    ("cp_count", None, "holds 3 sequences"),
    ("cp_shape", 1, "old_logp must have shape"),
    ("cp_optional", None, "passes other optional loss inputs"),
    ("mesh_mismatch", None, "process_group does not match the device mesh"),
])
def test_bad_input_raises_on_every_rank(two, kind, failing, text):
    results = two.run("bad_case", kind)
    for rank, (ok, value) in enumerate(results):
        assert not ok, f"rank {rank} accepted {kind}"
        name, message, _ = value
        assert name in ("ValueError", "TypeError", "RankError"), (rank, name, message)
        if failing is None or rank == failing:
            assert text in message, (rank, message)
        else:
            assert name == "RankError" and f"rank {failing}" in message and text in message, (rank, message)
    # the group still works after the errors
    assert two.values("vocab_case", dict(seed=1, B=1, T=2, H=4, V=5, sizes=[3, 2], op="linear", preset="sppo",
                                          dtype="fp32"))
