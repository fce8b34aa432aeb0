"""The two kernels of the backend interface (sppo_fast/backends/__init__.py), native CPU (csrc/) and
Triton (sppo_fast/kernels/), against an fp64 reference under docs/api.md §5's criterion: the kernels' error may exceed
the error of eager PyTorch at the logits' dtype by at most 1e-5 (fp32) or 1e-2 (bf16/fp16).

Every shared test runs once per backend through the `kernels` fixture. Without a GPU the Triton
kernels run in the interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1), which is
slow, so where a test needs big shapes to reach the native kernels' 4096-wide chunks it gives each
backend its own cases (`per_backend`): the Triton ones stay small; a GPU runs them compiled. The tests
of one backend only come last."""

import os
import subprocess
import sys
from dataclasses import dataclass
from types import ModuleType

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from spec_helpers import assert_spec_close, eager_logprobs, max_error

from sppo_fast import dispatch

BACKENDS = ("native", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IGNORE = -100


@dataclass(frozen=True)
class Kernels:
    """One backend under test: its module (the two interface functions) and the device it runs."""

    name: str
    module: ModuleType
    device: torch.device


@pytest.fixture(params=BACKENDS)
def kernels(request):
    """Each backend that can serve here, skipped as tests/conftest.py's `backend` fixture skips it:
    a native build missing under CI fails instead, since CI builds the extension."""
    name = request.param
    device = torch.device("cuda" if name == "triton" and torch.cuda.is_available() else "cpu")
    why = dispatch._unavailable(name, device)
    if why is not None:
        if name == "native" and os.environ.get("CI"):
            pytest.fail(f"the native CPU kernels must be built in CI: {why}")
        pytest.skip(f"backend {name} unavailable: {why}")
    module, _ = dispatch.load(name)
    return Kernels(name, module, device)


def case_id(value):
    """Test ids that name dtypes ("bfloat16", not "dtype3"); pytest's own for anything else."""
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else None


def per_backend(argnames, cases):
    """Parametrizes `kernels` with `argnames` from each backend's own list of cases, {name: [case]}."""
    params = [pytest.param(name, *(case if isinstance(case, tuple) else (case,)))
              for name in BACKENDS for case in cases[name]]
    return pytest.mark.parametrize(f"kernels,{argnames}", params, indirect=["kernels"], ids=case_id)


def only(name):
    """A test of one backend, through the same fixture (and so the same skip rules)."""
    return pytest.mark.parametrize("kernels", [name], indirect=True)


def make_case(kernels, rows, vocab, dtype, *, scale=3.0, offset=0.0, kept=None, neg_inf_frac=0.0,
              ignored_rows=(), seed=0):
    """Random logits (rows, vocab) in `dtype` and targets with some rows ignored, on the backend's
    device. Every row keeps one finite logit, `kept` (offset + 0.5 unless given): a row of only -inf
    has no distribution."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * scale + offset
    if neg_inf_frac > 0:
        logits[torch.rand(rows, vocab, generator=gen) < neg_inf_frac] = float("-inf")
    targets = torch.randint(0, max(vocab, 1), (rows,), generator=gen)
    for r in ignored_rows:
        targets[r] = IGNORE
    if rows and vocab:
        logits[torch.arange(rows), (targets.clamp(min=0) + 1) % vocab] = offset + 0.5 if kept is None else kept
    return logits.to(dtype).to(kernels.device), targets.to(kernels.device)


def coefficients(kernels, rows, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, generator=gen).to(kernels.device),
            torch.randn(rows, generator=gen).to(kernels.device))


def run_kernels(kernels, logits, targets, g_logp, g_ent, *, temperature=1.0, inplace=False,
                lse_dtype=torch.float32):
    """Forward then backward through the backend: (logp, entropy, lse, grad)."""
    logp, entropy, lse = kernels.module.token_logprobs_forward(logits, targets, temperature, IGNORE, True,
                                                               lse_dtype=lse_dtype)
    grad = kernels.module.token_logprobs_backward(logits, targets, lse, entropy, g_logp, g_ent, temperature,
                                                  IGNORE, inplace)
    return logp, entropy, lse, grad


def oracle(logits, targets, g_logp, g_ent, temperature):
    """fp64 autograd of docs/api.md §3.1: (logp, entropy, lse, grad)."""
    x = logits.detach().double().requires_grad_(True)
    logp, entropy = eager_logprobs(x, targets, temperature, IGNORE)
    lse = torch.logsumexp(x.detach() / temperature, dim=-1)
    grads = (g_logp.double(), None if g_ent is None else g_ent.double())
    outs = [o for o, g in zip((logp, entropy), grads) if g is not None]
    (grad,) = torch.autograd.grad(outs, x, [g for g in grads if g is not None])
    return logp.detach(), entropy.detach(), lse, grad


def eager(logits, targets, g_logp, g_ent, temperature):
    """Plain PyTorch at the logits' dtype, gradient by autograd: the error the criterion allows."""
    x = logits.detach().clone().requires_grad_(True)
    logp, entropy = eager_logprobs(x, targets, temperature, IGNORE)
    grads = (g_logp.to(logp.dtype), None if g_ent is None else g_ent.to(logp.dtype))
    outs = [o for o, g in zip((logp, entropy), grads) if g is not None]
    (grad,) = torch.autograd.grad(outs, x, [g for g in grads if g is not None])
    return logp.detach(), entropy.detach(), grad


def check_spec(kernels, logits, targets, *, temperature=1.0, lse_dtype=torch.float32, seed=1):
    """Values and gradient of the kernels within docs/api.md §5 of fp64; returns the kernels' outputs."""
    g_logp, g_ent = coefficients(kernels, targets.shape[0], seed)
    ours = run_kernels(kernels, logits, targets, g_logp, g_ent, temperature=temperature, lse_dtype=lse_dtype)
    ref = oracle(logits, targets, g_logp, g_ent, temperature)
    base = eager(logits, targets, g_logp, g_ent, temperature)
    assert ours[0].dtype == ours[1].dtype == torch.float32 and ours[2].dtype == lse_dtype
    assert ours[3].dtype == logits.dtype and ours[3].shape == logits.shape and ours[3].is_contiguous()
    for name, o, e, r in zip(("logp", "entropy", "grad"), (ours[0], ours[1], ours[3]), base,
                             (ref[0], ref[1], ref[3])):
        assert_spec_close(o, e, r, logits.dtype, name)
    valid = targets != IGNORE
    if valid.any():  # lse has no eager counterpart: hold it to rounding at its own size
        lse_err = max_error(ours[2][valid], ref[2][valid])
        assert lse_err <= 4e-7 * (1 + ref[2][valid].abs().max().item()), lse_err
    return ours


# 4128 = 4097 + 31 spans two chunks of the native online softmax and a partial block; the interpreter
# keeps to one fp32 lse and a vocabulary of 129 (a tile and one column).
MASKED_VOCAB_CASES = {
    "native": [(v, lse) for v in (1, 7, 33, 1000, 4097 + 31) for lse in (torch.float32, torch.float64)],
    "triton": [(v, torch.float32) for v in (1, 7, 129, 1000)],
}


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@per_backend("vocab,lse_dtype", MASKED_VOCAB_CASES)
def test_matches_fp64_with_masked_vocab_and_ignored_rows(kernels, vocab, lse_dtype, dtype, temperature):
    logits, targets = make_case(kernels, 6, vocab, dtype, neg_inf_frac=0.3 if vocab > 1 else 0.0,
                                ignored_rows=(2,), seed=vocab)
    logp, entropy, _, grad = check_spec(kernels, logits, targets, temperature=temperature, lse_dtype=lse_dtype)
    assert logp[2] == 0 and entropy[2] == 0 and not grad[2].any()


@per_backend("rows,dtype", {"native": [(3, dtype) for dtype in DTYPES], "triton": [(2, torch.bfloat16)]})
def test_realistic_vocabulary_not_a_power_of_two_nor_a_multiple_of_the_tile(kernels, rows, dtype):
    logits, targets = make_case(kernels, rows, 50257, dtype, scale=4.0, seed=3)
    check_spec(kernels, logits, targets)


def test_minus_inf_at_the_target_gives_minus_inf_logp_and_finite_rest(kernels):
    logits, targets = make_case(kernels, 3, 40, torch.float32, neg_inf_frac=0.2, seed=4)
    logits[0, targets[0]] = float("-inf")
    logp, entropy, _, grad = check_spec(kernels, logits, targets)
    assert logp[0] == float("-inf")
    assert torch.isfinite(entropy).all() and torch.isfinite(grad).all()


# {column: logit} of each row's only finite entry. native: in the last (partial) block, in the first
# followed by chunks of only -inf, in the second chunk after a chunk of only -inf; triton: the first
# two of these at tile scale.
CERTAIN_TOKEN_CASES = {
    "native": [(9000, ((8999, 1e4), (0, -3.0), (4100, 2.0)))],
    "triton": [(300, ((299, 1e4), (0, -3.0)))],
}


@per_backend("vocab,finite", CERTAIN_TOKEN_CASES)
def test_all_but_one_logit_minus_inf_is_a_certain_token(kernels, vocab, finite):
    logits = torch.full((len(finite), vocab), float("-inf"), device=kernels.device)
    for row, (column, value) in enumerate(finite):
        logits[row, column] = value
    targets = torch.tensor([column for column, _ in finite], device=kernels.device)
    logp, entropy, _, grad = check_spec(kernels, logits, targets)
    assert torch.equal(logp, torch.zeros(len(finite), device=kernels.device)) and torch.equal(entropy, logp)
    assert not grad.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=case_id)
def test_logits_of_magnitude_1e4(kernels, dtype):
    logits, targets = make_case(kernels, 4, 300, dtype, scale=1e4, seed=5)
    check_spec(kernels, logits, targets)
    check_spec(kernels, logits, targets, temperature=3.0)


@pytest.mark.parametrize("kept", [None, 0.5], ids=["kept-logit-among-the-rest", "kept-logit-far-below"])
def test_large_offset_near_ties_with_an_fp64_lse(kernels, kept):
    """Logits 1e4 + N(0, 1): p_j is O(1) while lse ~ 1e4, whose fp32 rounding (ulp/2 ~ 5e-4) would
    shift every p_j = exp(z_j - lse) by that relative amount in the backward. With an fp64 lse the
    kernels meet docs/api.md §5 here too; the interface's fp32 lse does where |lse| is moderate (below ~256).
    Each row's kept finite logit sits among the others (offset + 0.5) or far below them (0.5)."""
    logits, targets = make_case(kernels, 4, 7, torch.float32, scale=1.0, offset=1e4, kept=kept, seed=6)
    logits[0, :2] = 1e4  # an exact tie
    check_spec(kernels, logits, targets, lse_dtype=torch.float64)
    check_spec(kernels, logits, targets, temperature=0.7, lse_dtype=torch.float64)
    moderate, targets = make_case(kernels, 4, 7, torch.float32, scale=1.0, offset=150.0, kept=kept, seed=6)
    check_spec(kernels, moderate, targets)


@per_backend("vocab,nan_column", {"native": [(5000, 4500)], "triton": [(200, 150)]})
def test_nan_stays_in_its_row_and_ignored_rows_are_not_read(kernels, vocab, nan_column):
    logits, targets = make_case(kernels, 4, vocab, torch.float32, seed=7)
    g_logp, g_ent = coefficients(kernels, 4)
    clean = run_kernels(kernels, logits, targets, g_logp, g_ent)
    poisoned = logits.clone()
    poisoned[1, nan_column] = float("nan")
    poisoned[3, 10] = float("nan")
    targets = targets.clone()
    targets[3] = IGNORE
    logp, entropy, _, grad = run_kernels(kernels, poisoned, targets, g_logp, g_ent)
    assert torch.isnan(logp[1]) and torch.isnan(entropy[1]) and torch.isnan(grad[1]).all()
    assert logp[3] == 0 and entropy[3] == 0 and not grad[3].any()
    for out, ref in zip((logp, entropy, grad), (clean[0], clean[1], clean[3])):
        assert torch.equal(out[[0, 2]], ref[[0, 2]])


@per_backend("dtype", {"native": list(DTYPES), "triton": [torch.bfloat16]})
def test_row_stride_larger_than_the_vocabulary_in_place_and_not(kernels, dtype):
    dense, targets = make_case(kernels, 5, 130, dtype, neg_inf_frac=0.1, ignored_rows=(4,), seed=8)
    storage = torch.full((5, 150), 7.0, dtype=dtype, device=kernels.device)
    strided = storage[:, 11:141]
    strided.copy_(dense)
    g_logp, g_ent = coefficients(kernels, 5)
    expected = run_kernels(kernels, dense, targets, g_logp, g_ent)
    got = run_kernels(kernels, strided, targets, g_logp, g_ent)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    assert got[3].is_contiguous()
    in_place = run_kernels(kernels, strided, targets, g_logp, g_ent, inplace=True)
    assert in_place[3].data_ptr() == strided.data_ptr()
    assert torch.equal(strided, expected[3])
    assert (storage[:, :11] == 7).all() and (storage[:, 141:] == 7).all()  # neighbours untouched


@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@per_backend("vocab", {"native": [3333], "triton": [333]})
def test_in_place_backward_equals_the_out_of_place_one(kernels, vocab, dtype):
    logits, targets = make_case(kernels, 4, vocab, dtype, ignored_rows=(0,), seed=9)
    g_logp, g_ent = coefficients(kernels, 4)
    before = logits.clone()
    out_of_place = run_kernels(kernels, logits, targets, g_logp, g_ent)
    assert torch.equal(logits, before)  # the default never touches the caller's tensor
    buffer = logits.clone()
    in_place = run_kernels(kernels, buffer, targets, g_logp, g_ent, inplace=True)
    assert in_place[3] is buffer
    assert torch.equal(in_place[3], out_of_place[3])


def test_without_entropy(kernels):
    fwd, bwd = kernels.module.token_logprobs_forward, kernels.module.token_logprobs_backward
    logits, targets = make_case(kernels, 4, 257, torch.float16, neg_inf_frac=0.2, ignored_rows=(1,), seed=10)
    g_logp, _ = coefficients(kernels, 4)
    with_entropy = fwd(logits, targets, 1.3, IGNORE, True)
    logp, entropy, lse = fwd(logits, targets, 1.3, IGNORE, False)
    assert torch.equal(logp, with_entropy[0]) and torch.equal(lse, with_entropy[2])
    assert not entropy.any()
    grad = bwd(logits, targets, lse, entropy, g_logp, None, 1.3, IGNORE, False)
    ref = oracle(logits, targets, g_logp, None, 1.3)
    base = eager(logits, targets, g_logp, None, 1.3)
    assert_spec_close(grad, base[2], ref[3], torch.float16, "grad")


def test_empty_inputs(kernels):
    fwd, bwd = kernels.module.token_logprobs_forward, kernels.module.token_logprobs_backward
    logits = torch.randn(0, 50, device=kernels.device)
    targets = torch.zeros(0, dtype=torch.long, device=kernels.device)
    logp, entropy, lse = fwd(logits, targets, 1.0, IGNORE, True)
    assert all(o.shape == (0,) and o.dtype == torch.float32 for o in (logp, entropy, lse))
    grad = bwd(logits, targets, lse, entropy, logp, None, 1.0, IGNORE, False)
    assert grad.shape == (0, 50)
    no_vocab = torch.randn(3, 0, device=kernels.device)
    ignored = torch.full((3,), IGNORE, device=kernels.device)
    logp, entropy, lse = fwd(no_vocab, ignored, 1.0, IGNORE, True)
    assert not logp.any() and not entropy.any()
    grad = bwd(no_vocab, ignored, lse, entropy, logp, logp, 1.0, IGNORE, True)
    assert grad.shape == (3, 0)


# Each backend's space of random cases: the interpreter gets fewer, smaller, tamer ones and fp32 lse.
RANDOM_CASES = {
    "native": dict(examples=40, rows=5, vocab=700, scales=(0.1, 3.0, 30.0, 1e3), neg_inf_fracs=(0.0, 0.5, 0.95),
                   lse_dtypes=(torch.float32, torch.float64)),
    "triton": dict(examples=25, rows=4, vocab=300, scales=(0.1, 3.0, 30.0), neg_inf_fracs=(0.0, 0.5),
                   lse_dtypes=(torch.float32,)),
}


def test_random_small_cases(kernels):
    space = RANDOM_CASES[kernels.name]

    @settings(max_examples=space["examples"])
    @given(rows=st.integers(1, space["rows"]), vocab=st.integers(1, space["vocab"]),
           dtype=st.sampled_from(DTYPES), temperature=st.sampled_from([1.0, 0.6, 1.9]),
           scale=st.sampled_from(space["scales"]), neg_inf_frac=st.sampled_from(space["neg_inf_fracs"]),
           ignore_first=st.booleans(), seed=st.integers(0, 2**16))
    def check_random_case(rows, vocab, dtype, temperature, scale, neg_inf_frac, ignore_first, seed):
        logits, targets = make_case(kernels, rows, vocab, dtype, scale=scale, neg_inf_frac=neg_inf_frac,
                                    ignored_rows=(0,) if ignore_first else (), seed=seed)
        lse_dtypes = space["lse_dtypes"]  # alternated by seed, as the seed is drawn anyway
        check_spec(kernels, logits, targets, temperature=temperature, lse_dtype=lse_dtypes[seed % len(lse_dtypes)])

    check_random_case()


# ---- the native backend only ----


@only("native")
def test_the_widest_build_this_cpu_runs_is_loaded(kernels):
    capability = torch.backends.cpu.get_cpu_capability()
    expected = capability if capability in ("AVX2", "AVX512") else "DEFAULT"
    assert kernels.module.CPU_CAPABILITY == expected, kernels.module.describe()


NARROWER_BUILDS = {"AVX512": ("AVX2", "default"), "AVX2": ("default",)}


@only("native")
@pytest.mark.parametrize("capability", ["AVX2", "default"])
def test_the_narrower_builds_pass_the_native_kernel_tests(kernels, capability):
    """The widest build serves this CPU and the rest of the suite; the narrower ones serve other CPUs. Each
    one this CPU can run passes this file's and tests/test_one_pass_logits.py's native tests too, in a child
    with ATEN_CPU_CAPABILITY set (the default build's exp was once 4e-6 off with no test run on it)."""
    if capability not in NARROWER_BUILDS.get(torch.backends.cpu.get_cpu_capability(), ()):
        pytest.skip(f"{capability} is this CPU's own build or one it cannot run")
    here = os.path.dirname(__file__)
    files = [os.path.join(here, name) for name in ("test_kernels.py", "test_one_pass_logits.py")]
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files,
         "-k", "not triton and not narrower"],
        env={**os.environ, "ATEN_CPU_CAPABILITY": capability}, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]


@only("native")
def test_the_max_arrives_in_a_late_chunk(kernels):
    """The running max grows chunk after chunk: every rescale of S and W is exercised."""
    vocab = 5 * 4096 + 17
    ramp = torch.linspace(-30.0, 30.0, vocab, dtype=torch.float64)
    logits = (ramp + torch.randn(3, vocab, dtype=torch.float64)).float()
    logits[1] = logits[1].flip(0)  # ... and a row whose max comes first
    check_spec(kernels, logits, torch.tensor([vocab - 1, 0, vocab // 2]), temperature=0.9)


@only("native")
def test_the_sweeps_exp_is_as_accurate_as_documented(kernels):
    """Rows [0, d, -inf, ...] with the target at 0: for d <= -17 the row's lse is under 4e-8, so the
    backward's u = (d - lse_hi) - lse_lo rounds to d itself and the gradient at d is -exp(d) as the
    kernels' vectorised exp computes it (csrc/vec_math.h). Its relative error: the polynomial's 1.2e-7
    plus, in the builds with FMA, the one-FMA reduction's |n| 1.9e-9 (n = round(d log2e)); the default
    build's two-part reduction has none (its one-FMA form, rounding n ln2, was 4e-6 off). Exactly 0 under
    -88 (-inf too), and subnormal at most just above."""
    vocab = 32
    d = torch.linspace(-95.0, -17.0, 31 * 800, dtype=torch.float64).float()
    rows = torch.arange(d.numel())
    column = 1 + rows % (vocab - 1)  # every lane of the row's vector blocks
    logits = torch.full((d.numel(), vocab), float("-inf"))
    logits[:, 0] = 0.0
    logits[rows, column] = d
    targets = torch.zeros(d.numel(), dtype=torch.long)
    native = kernels.module
    logp, entropy, lse = native.token_logprobs_forward(logits, targets, 1.0, IGNORE, False)
    grad = native.token_logprobs_backward(logits, targets, lse, entropy, torch.ones(d.numel()), None, 1.0,
                                          IGNORE, False)
    p = -grad[rows, column].double()
    exact = d.double().exp()
    normal = d >= -87.3
    bound = 1.25e-7 + d.double().abs() * 1.4427 * 2e-9
    assert (((p - exact).abs() / exact)[normal] <= bound[normal]).all()
    assert ((p[~normal] >= 0) & (p[~normal] < 2.0 ** -125)).all()
    assert (p[d < -88.0] == 0).all()
    others = torch.ones_like(grad, dtype=torch.bool)
    others[:, 0] = False
    others[rows, column] = False
    assert (grad[others] == 0).all()  # the -inf logits


POOLED_VOCAB = 32768 + 5  # 64 rows of it in fp32: just over 8 MiB, the smallest pooled gradient


def pooled_gradient(native, logits, targets, seed):
    """(gradient, its expected value): the backward into a fresh (pooled) buffer, and the same
    coefficients in place on a copy of the logits, which takes nothing from the pool."""
    g_logp, g_ent = coefficients(native_kernels(native), logits.shape[0], seed=seed)
    logp, entropy, lse = native.token_logprobs_forward(logits, targets, 1.0, IGNORE, True)
    grad = native.token_logprobs_backward(logits, targets, lse, entropy, g_logp, g_ent, 1.0, IGNORE, False)
    expected = native.token_logprobs_backward(logits.clone(), targets, lse, entropy, g_logp, g_ent, 1.0,
                                              IGNORE, True)
    return grad, expected


def native_kernels(native):
    return Kernels("native", native, torch.device("cpu"))


@only("native")
def test_a_pooled_gradient_is_right_and_its_block_is_reused_once_it_dies(kernels):
    """Gradients of 8 MiB and more come from csrc/buffer_pool.cpp: a dead gradient's block serves the
    next one of its size, and a stale block never changes a result."""
    from sppo_fast import buffers

    native = kernels.module
    buffers.empty_cache()
    logits, targets = make_case(kernels, 64, POOLED_VOCAB, torch.float32, ignored_rows=(7,), seed=11)
    check_spec(kernels, logits, targets, temperature=1.3)
    grad, expected = pooled_gradient(native, logits, targets, seed=1)
    assert grad.is_contiguous() and grad.data_ptr() % (2 << 20) == 0
    assert torch.equal(grad, expected)
    address, capacity = grad.data_ptr(), 10 << 20  # 8.0 MiB + 20 KiB, rounded up to 2 MiB pages
    assert buffers.cached_bytes() == 0
    del grad
    assert buffers.cached_bytes() == capacity
    grad, expected = pooled_gradient(native, logits, targets, seed=2)  # other coefficients, same block
    assert grad.data_ptr() == address and buffers.cached_bytes() == 0
    assert torch.equal(grad, expected)
    del grad
    assert buffers.empty_cache() == capacity and buffers.cached_bytes() == 0


@only("native")
def test_live_gradients_never_share_a_block_and_the_pool_keeps_two(kernels):
    from sppo_fast import buffers

    native = kernels.module
    buffers.empty_cache()
    logits, targets = make_case(kernels, 64, POOLED_VOCAB, torch.float32, seed=12)
    live = [pooled_gradient(native, logits, targets, seed=s) for s in range(3)]
    assert len({grad.data_ptr() for grad, _ in live}) == 3
    for grad, expected in live:  # each later gradient left the earlier ones alone
        assert torch.equal(grad, expected)
    del grad, expected
    live.clear()
    assert buffers.cached_bytes() == 2 * (10 << 20)
    buffers.empty_cache()


@only("native")
def test_a_freed_block_serves_only_a_gradient_of_about_its_size(kernels):
    """A block is reused for a request at most 1/8 smaller than itself: a small gradient never pins a
    big block's memory, and a big one never gets a small block."""
    from sppo_fast import buffers

    native = kernels.module
    buffers.empty_cache()
    big, big_targets = make_case(kernels, 128, POOLED_VOCAB, torch.float32, seed=13)
    small, small_targets = make_case(kernels, 64, POOLED_VOCAB, torch.float32, seed=14)
    grad, _ = pooled_gradient(native, big, big_targets, seed=1)
    big_address = grad.data_ptr()
    del grad
    grad, expected = pooled_gradient(native, small, small_targets, seed=1)
    assert grad.data_ptr() != big_address and torch.equal(grad, expected)
    del grad, expected
    grad, expected = pooled_gradient(native, big, big_targets, seed=2)
    assert grad.data_ptr() == big_address and torch.equal(grad, expected)
    del grad, expected
    buffers.empty_cache()


@only("native")
@pytest.mark.parametrize("dtype, vocab", [(torch.float32, 32001), (torch.float32, 32000), (torch.bfloat16, 32000)],
                         ids=case_id)
def test_a_gradient_beyond_the_caches_written_past_them_equals_the_in_place_one(kernels, dtype, vocab):
    """Out of place, an fp32 gradient over 64 MiB is written with non-temporal stores (csrc/
    token_logprobs_backward.cpp, kStreamBytes) where a row starts 64-byte aligned, plain stores elsewhere
    (V = 32001: every 16th row is aligned) and for the tail and the target element after the sweep: bit
    for bit the in-place gradient, -inf logits and ignored rows included (bf16: plain stores, the same)."""
    rows = (70 << 20) // (vocab * dtype.itemsize) + 1
    logits, targets = make_case(kernels, rows, vocab, dtype, neg_inf_frac=0.01, ignored_rows=(3, 40), seed=12)
    assert logits.numel() * logits.element_size() > 64 << 20
    g_logp, g_ent = coefficients(kernels, rows)
    out_of_place = run_kernels(kernels, logits, targets, g_logp, g_ent, lse_dtype=torch.float64)[3]
    in_place = run_kernels(kernels, logits.clone(), targets, g_logp, g_ent, inplace=True, lse_dtype=torch.float64)[3]
    assert torch.equal(out_of_place, in_place)
    assert (out_of_place[3] == 0).all() and (out_of_place[40] == 0).all() and out_of_place[0].abs().sum() > 0
