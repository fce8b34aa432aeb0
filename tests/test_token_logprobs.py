"""token_logprobs and linear_logprobs on every backend: values and gradients against fp64 (docs/api.md §5)."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from spec_helpers import assert_spec_close, eager_logprobs, max_error

import sppo_fast as sf
from sppo_fast import dispatch, reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_against_fp64(logits, targets, *, temperature=1.0, ignore_index=-100, seed=0):
    """Values and gradients of (logp, entropy) under random upstream coefficients."""
    dtype = logits.dtype
    gen = torch.Generator().manual_seed(seed)
    g_logp = torch.randn(targets.shape, generator=gen).to(logits.device)
    g_ent = torch.randn(targets.shape, generator=gen).to(logits.device)

    def run(fn, x):
        x = x.detach().requires_grad_(True)
        logp, ent = fn(x)
        ((logp.double() * g_logp).sum() + (ent.double() * g_ent).sum()).backward()
        return logp, ent, x.grad

    ours = run(lambda x: sf.token_logprobs(x, targets, temperature=temperature, ignore_index=ignore_index,
                                           return_entropy=True), logits)
    eager = run(lambda x: eager_logprobs(x, targets, temperature, ignore_index), logits)
    oracle = run(lambda x: reference.token_logprobs(x, targets, temperature=temperature,
                                                    ignore_index=ignore_index, return_entropy=True),
                 logits.double())
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32
    assert ours[2].dtype == dtype and ours[2].shape == logits.shape
    for name, o, e, r in zip(("logp", "entropy", "grad"), ours, eager, oracle):
        assert_spec_close(o, e, r, dtype, name)
    return ours


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 7, 300, 1031])
def test_values_and_gradients(backend, dtype, vocab):
    _, device = backend
    torch.manual_seed(vocab)
    logits = (torch.randn(6, vocab) * 3).to(dtype).to(device)
    targets = torch.randint(0, vocab, (6,), device=device)
    check_against_fp64(logits, targets)


@pytest.mark.parametrize("vocab", [50257, 129920, 151936, 262144])
def test_large_odd_vocabularies(backend, vocab):
    name, device = backend
    rows = 1 if name == "triton" and device.type == "cpu" else 3  # the interpreter is slow
    torch.manual_seed(1)
    logits = (torch.randn(rows, vocab) * 4).to(device)
    targets = torch.randint(0, vocab, (rows,), device=device)
    check_against_fp64(logits, targets)


@pytest.mark.parametrize("dtype", DTYPES)
def test_temperature_ignore_index_and_3d(backend, dtype):
    _, device = backend
    torch.manual_seed(2)
    logits = (torch.randn(2, 5, 37) * 2).to(dtype).to(device)
    targets = torch.randint(0, 37, (2, 5), device=device)
    targets[0, 1] = targets[1, 4] = -1
    logp, ent, grad = check_against_fp64(logits, targets, temperature=0.7, ignore_index=-1)
    assert logp.shape == (2, 5)
    assert logp[0, 1] == 0 and ent[1, 4] == 0
    assert (grad[0, 1] == 0).all() and (grad[1, 4] == 0).all()


def test_minus_inf_and_huge_logits(backend):
    _, device = backend
    torch.manual_seed(3)
    logits = torch.randn(5, 40) * 1e4
    logits[0, :30] = float("-inf")  # masked vocabulary
    logits[1, 5] = float("-inf")  # the target itself is impossible
    logits[2, 1:] = float("-inf")  # a single live entry
    targets = torch.tensor([35, 5, 0, 7, 9])
    logp, ent, grad = check_against_fp64(logits.to(device), targets.to(device), temperature=1.3)
    assert logp[1].item() == float("-inf")
    assert torch.isfinite(ent).all() and torch.isfinite(grad[[0, 2, 3, 4]]).all()
    assert grad[0, :30].abs().max() == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(backend, dtype):
    _, device = backend
    torch.manual_seed(4)
    wide = (torch.randn(8, 3, 90) * 2).to(dtype).to(device)
    logits = wide[::2, :, 5:70]  # strided rows, offset columns
    targets = torch.randint(0, 65, (8, 3), device=device)[::2]
    check_against_fp64(logits, targets)
    transposed = (torch.randn(3, 4, 33)).to(dtype).to(device).transpose(0, 1)
    check_against_fp64(transposed, torch.randint(0, 33, (4, 3), device=device))


def test_nan_stays_in_its_row(backend):
    _, device = backend
    logits = torch.randn(4, 50, device=device, requires_grad=True)
    with torch.no_grad():
        logits[1, 7] = float("nan")
    targets = torch.randint(0, 50, (4,), device=device)
    logp, ent = sf.token_logprobs(logits, targets, return_entropy=True)
    (logp.sum() + ent.sum()).backward()
    assert torch.isnan(logp[1]) and torch.isnan(ent[1])
    keep = [0, 2, 3]
    assert torch.isfinite(logp[keep]).all() and torch.isfinite(ent[keep]).all()
    assert torch.isfinite(logits.grad[keep]).all()


def test_empty_inputs(backend):
    _, device = backend
    logits = torch.randn(0, 5, 11, device=device, requires_grad=True)
    logp, ent = sf.token_logprobs(logits, torch.zeros(0, 5, dtype=torch.long, device=device),
                                  return_entropy=True)
    assert logp.shape == (0, 5) and ent.shape == (0, 5)
    logp.sum().backward()
    assert logits.grad.shape == logits.shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_backward_writes_the_gradient_into_the_logits(backend, dtype):
    _, device = backend
    torch.manual_seed(5)
    base = (torch.randn(4, 6, 29) * 2).to(dtype).to(device)
    targets = torch.randint(0, 29, (4, 6), device=device)
    expected = base.clone().requires_grad_(True)
    sf.token_logprobs(expected, targets).sum().backward()

    logits = base.clone().requires_grad_(True)
    storage = logits.data_ptr()
    logp = sf.token_logprobs(logits * 1.0, targets, inplace_backward=True)  # a non-leaf, as in a model
    logp.sum().backward()
    torch.testing.assert_close(logits.grad, expected.grad, rtol=0, atol=0)

    leaf = base.clone().requires_grad_(True)
    sf.token_logprobs(leaf, targets, inplace_backward=True).sum().backward()
    assert leaf.data_ptr() == storage or leaf.grad.data_ptr() == leaf.data_ptr()
    torch.testing.assert_close(leaf.grad, expected.grad, rtol=0, atol=0)


def test_default_backward_leaves_the_logits_alone(backend):
    _, device = backend
    logits = torch.randn(3, 17, device=device, requires_grad=True)
    before = logits.detach().clone()
    sf.token_logprobs(logits, torch.randint(0, 17, (3,), device=device)).sum().backward()
    assert torch.equal(logits.detach(), before)


def test_an_entropy_without_gradient_reaches_the_kernel_as_none(backend, monkeypatch):
    """An entropy kept as a metric gets no zeros tensor (the kernel would sweep its term for nothing);
    used in the loss, it does; the gradient is right either way."""
    name, device = backend
    module = dispatch.load(name)[0]
    seen = []
    original = module.token_logprobs_backward

    def spy(*args):
        seen.append(args[5] is None)
        return original(*args)

    monkeypatch.setattr(module, "token_logprobs_backward", spy)
    logits = torch.randn(4, 33, device=device, requires_grad=True)
    targets = torch.randint(0, 33, (4,), device=device)
    logp, entropy = sf.token_logprobs(logits, targets, return_entropy=True)
    (grad,) = torch.autograd.grad(logp.sum(), logits)
    logp, entropy = sf.token_logprobs(logits, targets, return_entropy=True)
    (grad_both,) = torch.autograd.grad(logp.sum() + entropy.sum(), logits)
    assert seen == [True, False]
    x = logits.detach().double().requires_grad_(True)
    logp64, entropy64 = reference.token_logprobs(x, targets, return_entropy=True)
    (want,) = torch.autograd.grad(logp64.sum(), x, retain_graph=True)
    (want_both,) = torch.autograd.grad(logp64.sum() + entropy64.sum(), x)
    torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_both.double(), want_both, rtol=1e-5, atol=1e-6)


@settings(max_examples=12)
@given(rows=st.integers(1, 5), vocab=st.integers(1, 300), scale=st.sampled_from([0.1, 1.0, 30.0, 3e3]),
       temperature=st.floats(0.25, 4.0), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
       ignore_some=st.booleans())
def test_hypothesis_shapes_and_values(backend, rows, vocab, scale, temperature, dtype, seed, ignore_some):
    _, device = backend
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen) * scale).to(dtype).to(device)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    if ignore_some:
        targets[torch.rand(rows, generator=gen) < 0.3] = -100
    check_against_fp64(logits, targets.to(device), temperature=temperature, seed=seed)


# ----------------------------------------------------------------------------------------------------
# The linear form


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_logprobs_matches_materialised_logits(backend, dtype, with_bias):
    _, device = backend
    torch.manual_seed(6)
    B, T, H, V = 2, 7, 16, 203
    hidden = (torch.randn(B, T, H) * 0.5).to(dtype).to(device)
    weight = (torch.randn(V, H) * 0.5).to(dtype).to(device)
    bias = (torch.randn(V) * 0.1).to(dtype).to(device) if with_bias else None
    targets = torch.randint(0, V, (B, T), device=device)
    targets[1, 3] = -100
    g = torch.randn(2, B, T, device=device)

    def run(fn, *tensors):
        leaves = [t.detach().requires_grad_(True) if t is not None else None for t in tensors]
        logp, ent = fn(*leaves)
        ((logp.double() * g[0]).sum() + (ent.double() * g[1]).sum()).backward()
        return [logp, ent] + [t.grad for t in leaves if t is not None]

    def ours(h, w, b):
        return sf.linear_logprobs(h, w, targets, bias=b, temperature=0.9, return_entropy=True, chunk_size=4)

    def eager(h, w, b):
        logits = h @ w.T + (b if b is not None else 0)
        return eager_logprobs(logits, targets, 0.9)

    def oracle(h, w, b):
        return reference.linear_logprobs(h, w, targets, bias=b, temperature=0.9, return_entropy=True)

    args = (hidden, weight, bias)
    results = [run(fn, *(a.double() if fn is oracle and a is not None else a for a in args))
               for fn in (ours, eager, oracle)]
    names = ["logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"]
    for name, o, e, r in zip(names, *results):
        assert_spec_close(o, e, r, dtype, name)


def test_linear_chunk_size_does_not_change_results(backend):
    _, device = backend
    torch.manual_seed(7)
    hidden, weight = torch.randn(13, 8, device=device), torch.randn(97, 8, device=device)
    targets = torch.randint(0, 97, (13,), device=device)
    outs = [sf.linear_logprobs(hidden, weight, targets, chunk_size=c) for c in (1, 5, 13, 100)]
    for o in outs[1:]:
        assert max_error(o, outs[0].double()) < 1e-5


def test_large_offset_logits_keep_fp32_accuracy(backend):
    """|lse| ~ 1e4 with a spread-out distribution: an fp32 lse would put 5e-4 into every gradient."""
    _, device = backend
    torch.manual_seed(8)
    logits = (1e4 + torch.randn(4, 300)).to(device)
    check_against_fp64(logits, torch.randint(0, 300, (4,), device=device))
