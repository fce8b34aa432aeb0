"""The two Triton kernels (kernels/, served by sppo_fast.backends.triton) at the backend interface,
against the fp64 reference under SPEC §5's criterion. Without a GPU they run in the Triton interpreter
on CPU tensors, so the shapes are small; a GPU runs the same tests compiled."""

import os
import subprocess
import sys
import textwrap

import torch

if not torch.cuda.is_available():  # must precede the first import of the kernels (tests/conftest.py too)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import hypothesis.strategies as st  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402

pytest.importorskip("triton")

from spec_helpers import assert_spec_close, eager_logprobs, max_error  # noqa: E402

from sppo_fast import reference  # noqa: E402
from sppo_fast.backends import triton as backend  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IGNORE = -100


def make_case(rows, vocab, dtype, *, scale=3.0, offset=0.0, neg_inf_frac=0.0, ignored_rows=(), seed=0):
    """Random logits (rows, vocab) in `dtype` on DEVICE and targets with some rows ignored."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * scale + offset
    if neg_inf_frac > 0:
        logits[torch.rand(rows, vocab, generator=gen) < neg_inf_frac] = float("-inf")
    targets = torch.randint(0, max(vocab, 1), (rows,), generator=gen)
    for r in ignored_rows:
        targets[r] = IGNORE
    if rows and vocab:  # keep one finite logit per row: a row of only -inf has no distribution
        logits[torch.arange(rows), (targets.clamp(min=0) + 1) % vocab] = 0.5
    return logits.to(dtype).to(DEVICE), targets.to(DEVICE)


def coefficients(rows, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, generator=gen).to(DEVICE), torch.randn(rows, generator=gen).to(DEVICE))


def run_kernels(logits, targets, g_logp, g_ent, *, temperature=1.0, inplace=False, lse_dtype=torch.float32):
    """Forward then backward through the kernels; returns (logp, entropy, lse, grad)."""
    logp, entropy, lse = backend.token_logprobs_forward(logits, targets, temperature, IGNORE, True, lse_dtype)
    grad = backend.token_logprobs_backward(logits, targets, lse, entropy, g_logp, g_ent, temperature, IGNORE,
                                           inplace)
    return logp, entropy, lse, grad


def oracle(logits, targets, g_logp, g_ent, temperature):
    """fp64 reference (SPEC §3.1): (logp, entropy, lse, grad)."""
    logp, entropy, lse = reference.logprobs_entropy_lse(logits.double(), targets, temperature, IGNORE)
    grad = reference.logprobs_grad(logits.double(), targets, lse, entropy, g_logp.double(),
                                   None if g_ent is None else g_ent.double(), temperature, IGNORE)
    return logp, entropy, lse, grad


def eager(logits, targets, g_logp, g_ent, temperature):
    """Plain PyTorch at the logits' dtype, gradient by autograd: the error the criterion allows."""
    x = logits.detach().clone().requires_grad_(True)
    logp, entropy = eager_logprobs(x, targets, temperature, IGNORE)
    outs, grads = (logp, entropy), (g_logp.to(logp.dtype), g_ent.to(logp.dtype))
    (grad,) = torch.autograd.grad(outs, x, grads)
    return logp, entropy, grad


def check_spec(logits, targets, *, temperature=1.0, lse_dtype=torch.float32, seed=1):
    """Values and gradient of the kernels within SPEC §5 of fp64; returns the kernels' outputs."""
    g_logp, g_ent = coefficients(targets.shape[0], seed)
    ours = run_kernels(logits, targets, g_logp, g_ent, temperature=temperature, lse_dtype=lse_dtype)
    ref = oracle(logits, targets, g_logp, g_ent, temperature)
    base = eager(logits, targets, g_logp, g_ent, temperature)
    assert ours[0].dtype == ours[1].dtype == torch.float32 and ours[2].dtype == lse_dtype
    assert ours[3].dtype == logits.dtype and ours[3].shape == logits.shape and ours[3].is_contiguous()
    for name, o, e, r in zip(("logp", "entropy", "grad"), (ours[0], ours[1], ours[3]), base,
                             (ref[0], ref[1], ref[3])):
        assert_spec_close(o, e, r, logits.dtype, name)
    valid = targets != IGNORE
    if valid.any():  # lse has no eager counterpart: hold it to fp32 rounding of its own size
        lse_err = max_error(ours[2][valid], ref[2][valid])
        assert lse_err <= 4e-7 * (1 + ref[2][valid].abs().max().item()), lse_err
    return ours


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 7, 129, 1000])
def test_matches_fp64_with_masked_vocab_and_ignored_rows(vocab, dtype, temperature):
    logits, targets = make_case(6, vocab, dtype, neg_inf_frac=0.3 if vocab > 1 else 0.0, ignored_rows=(2,),
                                seed=vocab)
    logp, entropy, _, grad = check_spec(logits, targets, temperature=temperature)
    assert logp[2] == 0 and entropy[2] == 0 and not grad[2].any()


def test_vocabulary_not_a_multiple_of_the_tile_at_realistic_size():
    logits, targets = make_case(2, 50257, torch.bfloat16, scale=4.0, seed=3)
    check_spec(logits, targets)


def test_minus_inf_at_the_target_gives_minus_inf_logp_and_finite_rest():
    logits, targets = make_case(3, 40, torch.float32, neg_inf_frac=0.2, seed=4)
    logits[0, targets[0]] = float("-inf")
    logp, entropy, _, grad = check_spec(logits, targets)
    assert logp[0] == float("-inf")
    assert torch.isfinite(entropy).all() and torch.isfinite(grad).all()


def test_all_but_one_logit_minus_inf_is_a_certain_token():
    logits = torch.full((2, 300), float("-inf"), device=DEVICE)
    logits[0, 299] = 1e4  # the only finite entry sits in the last (partial) tile
    logits[1, 0] = -3.0  # ... or in the first, followed by tiles of only -inf
    targets = torch.tensor([299, 0], device=DEVICE)
    logp, entropy, _, grad = check_spec(logits, targets)
    assert torch.equal(logp, torch.zeros(2, device=DEVICE)) and torch.equal(entropy, logp)
    assert not grad.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_of_magnitude_1e4(dtype):
    logits, targets = make_case(4, 300, dtype, scale=1e4, seed=5)
    check_spec(logits, targets)
    check_spec(logits, targets, temperature=3.0)


def test_large_offset_near_ties_need_an_fp64_lse():
    """Logits 1e4 + N(0, 1) in fp32: p_j is O(1) while lse ~ 1e4, whose fp32 rounding (ulp/2 ~ 5e-4)
    would shift every p_j = exp(z_j - lse) by that relative amount in the backward. With an fp64 lse
    the kernels meet SPEC §5 here too; the interface's fp32 lse does so for |lse| below ~256."""
    logits, targets = make_case(4, 7, torch.float32, scale=1.0, offset=1e4, seed=6)
    logits[0, :2] = 1e4  # an exact tie
    check_spec(logits, targets, lse_dtype=torch.float64)
    check_spec(logits, targets, temperature=0.7, lse_dtype=torch.float64)
    moderate, targets = make_case(4, 7, torch.float32, scale=1.0, offset=150.0, seed=6)
    check_spec(moderate, targets)


def test_nan_stays_in_its_row_and_ignored_rows_are_not_read():
    logits, targets = make_case(4, 200, torch.float32, seed=7)
    g_logp, g_ent = coefficients(4)
    clean = run_kernels(logits, targets, g_logp, g_ent)
    poisoned = logits.clone()
    poisoned[1, 150] = float("nan")
    poisoned[3, 10] = float("nan")
    targets = targets.clone()
    targets[3] = IGNORE
    logp, entropy, _, grad = run_kernels(poisoned, targets, g_logp, g_ent)
    assert torch.isnan(logp[1]) and torch.isnan(entropy[1]) and torch.isnan(grad[1]).all()
    assert logp[3] == 0 and entropy[3] == 0 and not grad[3].any()
    for out, ref in zip((logp, entropy, grad), (clean[0], clean[1], clean[3])):
        assert torch.equal(out[[0, 2]], ref[[0, 2]])


def test_row_stride_larger_than_the_vocabulary_in_place_and_not():
    dense, targets = make_case(5, 130, torch.bfloat16, neg_inf_frac=0.1, ignored_rows=(4,), seed=8)
    storage = torch.full((5, 150), 7.0, dtype=torch.bfloat16, device=DEVICE)
    strided = storage[:, 11:141]
    strided.copy_(dense)
    g_logp, g_ent = coefficients(5)
    expected = run_kernels(dense, targets, g_logp, g_ent)
    got = run_kernels(strided, targets, g_logp, g_ent)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    assert got[3].is_contiguous()
    in_place = run_kernels(strided, targets, g_logp, g_ent, inplace=True)
    assert in_place[3].data_ptr() == strided.data_ptr()
    assert torch.equal(strided, expected[3])
    assert (storage[:, :11] == 7).all() and (storage[:, 141:] == 7).all()  # neighbours untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_backward_equals_the_out_of_place_one(dtype):
    logits, targets = make_case(4, 333, dtype, ignored_rows=(0,), seed=9)
    g_logp, g_ent = coefficients(4)
    out_of_place = run_kernels(logits, targets, g_logp, g_ent)
    buffer = logits.clone()
    in_place = run_kernels(buffer, targets, g_logp, g_ent, inplace=True)
    assert in_place[3] is buffer
    assert torch.equal(in_place[3], out_of_place[3])
    assert torch.equal(logits, logits.clone())  # the out-of-place run left its input alone


def test_without_entropy():
    logits, targets = make_case(4, 257, torch.float16, neg_inf_frac=0.2, ignored_rows=(1,), seed=10)
    g_logp, _ = coefficients(4)
    with_entropy = backend.token_logprobs_forward(logits, targets, 1.3, IGNORE, True)
    logp, entropy, lse = backend.token_logprobs_forward(logits, targets, 1.3, IGNORE, False)
    assert torch.equal(logp, with_entropy[0]) and torch.equal(lse, with_entropy[2])
    assert not entropy.any()
    grad = backend.token_logprobs_backward(logits, targets, lse, entropy, g_logp, None, 1.3, IGNORE, False)
    ref = oracle(logits, targets, g_logp, None, 1.3)
    x = logits.detach().clone().requires_grad_(True)
    (eager_grad,) = torch.autograd.grad(eager_logprobs(x, targets, 1.3, IGNORE)[0], x, g_logp.to(x.dtype))
    assert_spec_close(grad, eager_grad, ref[3], torch.float16, "grad")


def test_empty_inputs():
    logits = torch.randn(0, 50, device=DEVICE)
    targets = torch.zeros(0, dtype=torch.long, device=DEVICE)
    outs = backend.token_logprobs_forward(logits, targets, 1.0, IGNORE, True)
    assert all(o.shape == (0,) and o.dtype == torch.float32 for o in outs)
    grad = backend.token_logprobs_backward(logits, targets, *outs[2::-2], outs[0], None, 1.0, IGNORE, False)
    assert grad.shape == (0, 50)
    no_vocab = torch.randn(3, 0, device=DEVICE)
    ignored = torch.full((3,), IGNORE, device=DEVICE)
    logp, entropy, lse = backend.token_logprobs_forward(no_vocab, ignored, 1.0, IGNORE, True)
    assert not logp.any() and not entropy.any()
    grad = backend.token_logprobs_backward(no_vocab, ignored, lse, entropy, logp, logp, 1.0, IGNORE, True)
    assert grad.shape == (3, 0)


@settings(max_examples=25)
@given(rows=st.integers(1, 4), vocab=st.integers(1, 300), dtype=st.sampled_from(DTYPES),
       temperature=st.sampled_from([1.0, 0.6, 1.9]), scale=st.sampled_from([0.1, 3.0, 30.0]),
       neg_inf_frac=st.sampled_from([0.0, 0.5]), ignore_first=st.booleans(), seed=st.integers(0, 2**16))
def test_random_small_cases(rows, vocab, dtype, temperature, scale, neg_inf_frac, ignore_first, seed):
    logits, targets = make_case(rows, vocab, dtype, scale=scale, neg_inf_frac=neg_inf_frac,
                                ignored_rows=(0,) if ignore_first else (), seed=seed)
    check_spec(logits, targets, temperature=temperature)


COMPILE_FOR_SM90 = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from sppo_fast.kernels import token_logprobs_backward as bwd, token_logprobs_forward as fwd

    def compile_ptx(kernel, signature, constexprs, num_warps):
        src = ASTSource(kernel, signature, constexprs=constexprs)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm

    for dtype in ("*fp32", "*bf16", "*fp16"):
        for flag in (False, True):
            common = {"V": "i32", "ignore_index": "i32", "targets_ptr": "*i64", "entropy_ptr": "*fp32",
                      "logits_ptr": dtype, "logits_row_stride": "i32", "lse_ptr": "*fp32",
                      "temperature": "fp32", "SCALE": "constexpr", "BLOCK_V": "constexpr"}
            f_sig = dict(common, logp_ptr="*fp32", rows_bucket="i32", COMPUTE_ENTROPY="constexpr")
            f_sig = {k: f_sig[k] for k in fwd.token_logprobs_forward_kernel.arg_names}
            for block, warps in ((8192, 4), (1024, 16)):
                asm = compile_ptx(fwd.token_logprobs_forward_kernel, f_sig,
                                  {"SCALE": flag, "COMPUTE_ENTROPY": flag, "BLOCK_V": block}, warps)
                assert "cubin" in asm
            b_sig = dict(common, grad_ptr=dtype, grad_row_stride="i32", grad_logp_ptr="*fp32",
                         grad_entropy_ptr="*fp32", inv_temperature="fp32", HAS_GRAD_ENTROPY="constexpr")
            b_sig = {k: b_sig[k] for k in bwd.token_logprobs_backward_kernel.arg_names}
            asm = compile_ptx(bwd.token_logprobs_backward_kernel, b_sig,
                              {"SCALE": flag, "HAS_GRAD_ENTROPY": flag, "BLOCK_V": 4096}, 8)
            assert "cubin" in asm
            # row * stride is a 64-bit product even when the stride arrives as a 32-bit integer
            for stride in ("logits_row_stride", "grad_row_stride"):
                assert f"arith.extsi %{stride} : i32 to i64" in asm["ttir"], f"row * {stride} is 32-bit"
    print("compiled")
""")


def test_kernels_compile_for_an_sm90_gpu():
    """What the interpreter cannot show: the kernels pass Triton's compiler down to a cubin."""
    triton = pytest.importorskip("triton")
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
