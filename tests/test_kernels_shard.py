"""Vocabulary parallelism (tensor-parallel lm_head), sppo_fast/backends/__init__.py: each rank runs the two
kernels on its shard (N, V_r) of the logits with local target ids, and a target outside [0, V_r) that is not
ignore_index lies in another rank's shard: logp 0 and the shard's own lse and entropy in the forward, no
one-hot term in the backward, no read or write out of bounds. Every backend against fp64 written here, and
the real use: shards' forwards combined into the global lse, logp and entropy, and the shards' backwards
with the global lse and entropy concatenated into the gradient of the full logits.

Through tests/conftest.py's `backend` fixture (each backend that can serve here, under use_backend); the
Triton kernels run in the interpreter without a GPU, so they get few and tiny cases."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from spec_helpers import eager_logprobs

from sppo_fast import dispatch

IGNORE = -100
DTYPES = (torch.float32, torch.bfloat16)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # relative and absolute, against fp64
TEMPERATURES = (1.0, 0.7, 1.9)

# Each backend's space of cases: the interpreter gets few, with the two odd vocabularies only.
CASES = {
    "native": dict(examples=30, rows=6, vocabs=(37, 129, 301, 4097 + 31)),  # 4128: two native chunks
    "reference": dict(examples=20, rows=6, vocabs=(37, 129, 301)),
    "triton": dict(examples=8, rows=4, vocabs=(37, 129)),
}


def case_id(value):
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else None


def kernels_of(backend):
    """(module, name, device) of the backend the fixture forced."""
    name, device = backend
    return dispatch.backend_for(device), name, device


def make_logits(rows, vocab, dtype, device, seed, neg_inf_frac=0.3):
    """Random logits with -inf entries; every 4th column stays finite, so that each row of any shard of
    at least 4 columns has a distribution."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * 3.0
    masked = torch.rand(rows, vocab, generator=gen) < neg_inf_frac
    masked[:, ::4] = False
    logits[masked] = float("-inf")
    return logits.to(dtype).to(device)


def coefficients(rows, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, generator=gen).to(device), torch.randn(rows, generator=gen).to(device)


def expected_forward(logits, targets, temperature, ignore_index):
    """fp64 (logp, entropy, lse) of the extended contract."""
    z = logits.double() / temperature
    ignored = targets == ignore_index
    local = ~ignored & (targets >= 0) & (targets < z.shape[1])
    lse = torch.logsumexp(z, dim=-1)
    log_p = z - lse[:, None]
    p = log_p.exp()
    entropy = -(p * torch.where(p > 0, log_p, 0.0)).sum(-1)
    logp = log_p.gather(1, torch.where(local, targets, 0)[:, None]).squeeze(1)
    return torch.where(local, logp, 0.0), torch.where(ignored, 0.0, entropy), lse


def expected_grad(logits, targets, lse, entropy, g_logp, g_ent, temperature, ignore_index):
    """fp64 gradient of the extended contract, with the lse and entropy given."""
    z = logits.double() / temperature
    ignored = targets == ignore_index
    local = ~ignored & (targets >= 0) & (targets < z.shape[1])
    log_p = z - lse.double()[:, None]
    p = log_p.exp()
    onehot = torch.zeros_like(p).scatter_(1, torch.where(local, targets, 0)[:, None], local[:, None].double())
    grad = g_logp.double()[:, None] * (onehot - p)
    if g_ent is not None:
        grad -= g_ent.double()[:, None] * torch.where(p > 0, p * (log_p + entropy.double()[:, None]), 0.0)
    return torch.where(ignored[:, None], 0.0, grad) / temperature


def assert_close(got, want, dtype, what):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=tol, atol=tol,
                               msg=lambda m: f"{what}: {m}")


# ---- rows mixing in-range, out-of-shard and ignored targets ----


def check_mixed_targets(kernels, device, rows, vocab, dtype, temperature, ignore_index, seed):
    logits = make_logits(rows, vocab, dtype, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    # the other marker (-100 or -1) is an out-of-shard target when it is not ignore_index
    out_of_shard = [-1, -100, vocab, vocab + 7, -(2**40), 2**40]
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    kinds = torch.randint(0, 3, (rows,), generator=gen)  # 0 in range, 1 out of shard, 2 ignored
    kinds[:3] = torch.tensor([0, 1, 2])[: min(rows, 3)]
    for i in range(rows):
        if kinds[i] == 1:
            targets[i] = out_of_shard[(seed + i) % len(out_of_shard)]
        elif kinds[i] == 2:
            targets[i] = ignore_index
    targets = targets.to(device)
    ignored = (targets == ignore_index).cpu()

    logp, entropy, lse = kernels.token_logprobs_forward(logits, targets, temperature, ignore_index, True,
                                                        lse_dtype=torch.float64)
    want = expected_forward(logits, targets, temperature, ignore_index)
    assert_close(logp, want[0], dtype, "logp")
    assert_close(entropy, want[1], dtype, "entropy")
    assert_close(lse[~ignored], want[2][~ignored], dtype, "lse")

    g_logp, g_ent = coefficients(rows, device, seed + 2)
    for grad_entropy in (g_ent, None):
        for inplace in (False, True):
            buffer = logits.clone() if inplace else logits
            grad = kernels.token_logprobs_backward(buffer, targets, lse, entropy, g_logp, grad_entropy,
                                                   temperature, ignore_index, inplace)
            assert grad.dtype == dtype and grad.shape == logits.shape
            want_grad = expected_grad(logits, targets, lse, entropy, g_logp, grad_entropy, temperature,
                                      ignore_index)
            assert_close(grad, want_grad, dtype, f"grad (entropy term: {grad_entropy is not None}, {inplace=})")
            assert not grad[ignored].any()


@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
def test_out_of_shard_targets_match_fp64(backend, dtype):
    kernels, name, device = kernels_of(backend)
    space = CASES[name]

    @settings(max_examples=space["examples"])
    @given(rows=st.integers(3, space["rows"]), vocab=st.sampled_from(space["vocabs"]),
           temperature=st.sampled_from(TEMPERATURES), ignore_index=st.sampled_from([IGNORE, -1]),
           seed=st.integers(0, 2**16))
    def check(rows, vocab, temperature, ignore_index, seed):
        check_mixed_targets(kernels, device, rows, vocab, dtype, temperature, ignore_index, seed)

    check()


def test_out_of_shard_targets_are_neither_read_nor_written(backend):
    """The shard is a view between NaN columns: reading x[-1] or x[V] would make logp NaN, writing
    out[-1] or out[V] in place would overwrite a NaN."""
    kernels, _, device = kernels_of(backend)
    rows, vocab = 4, 37
    storage = torch.full((rows, vocab + 2), float("nan"), device=device)
    shard = storage[:, 1:-1]
    shard.copy_(make_logits(rows, vocab, torch.float32, device, seed=3))
    targets = torch.tensor([-1, vocab, 4, IGNORE], device=device)  # column 4 is finite
    logp, entropy, lse = kernels.token_logprobs_forward(shard, targets, 1.0, IGNORE, True, lse_dtype=torch.float64)
    assert torch.equal(logp[:2], torch.zeros(2, device=device)) and torch.isfinite(logp).all()
    assert torch.isfinite(entropy).all() and torch.isfinite(lse[:3]).all()
    g_logp, g_ent = coefficients(rows, device, seed=4)
    grad = kernels.token_logprobs_backward(shard, targets, lse, entropy, g_logp, g_ent, 1.0, IGNORE, True)
    assert grad.data_ptr() == shard.data_ptr() and torch.isfinite(shard).all()
    assert torch.isnan(storage[:, 0]).all() and torch.isnan(storage[:, -1]).all()


# ---- the real use: a problem split into vocabulary shards ----


def shard_edges(vocab, n_shards):
    """Uneven shards, each of at least 4 columns for the vocabularies used here."""
    cuts = {2: (0.37,), 3: (0.23, 0.61)}[n_shards]
    return [0, *(round(vocab * c) for c in cuts), vocab]


def check_sharded(kernels, device, rows, vocab, n_shards, dtype, temperature, seed):
    logits = make_logits(rows, vocab, dtype, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[torch.rand(rows, generator=gen) < 0.2] = IGNORE
    targets = targets.to(device)
    ignored = (targets == IGNORE).cpu()
    edges = shard_edges(vocab, n_shards)
    shards = list(zip(edges, edges[1:]))

    def local_targets(start, end, r):
        owned = (targets >= start) & (targets < end)
        other = -1 if r % 2 else end - start + r  # both kinds of out-of-shard id: negative and >= V_r
        return torch.where(owned, targets - start, torch.where(targets == IGNORE, IGNORE, other)), owned

    # forwards per shard, combined as a caller would (sppo_fast/backends/__init__.py)
    outs = [kernels.token_logprobs_forward(logits[:, a:b], local_targets(a, b, r)[0], temperature, IGNORE,
                                           True, lse_dtype=torch.float64) for r, (a, b) in enumerate(shards)]
    lse_r = torch.stack([o[2].double() for o in outs])
    lse = torch.logsumexp(lse_r, dim=0)
    logp = sum(torch.where(local_targets(a, b, r)[1], o[0].double() + o[2] - lse, 0.0)
               for r, ((a, b), o) in enumerate(zip(shards, outs)))
    entropy = sum(torch.exp(o[2] - lse) * (o[1].double() + lse - o[2]) for o in outs)
    want_logp, want_entropy, want_lse = expected_forward(logits, targets, temperature, IGNORE)
    kept = ~ignored
    assert_close(lse[kept], want_lse[kept], dtype, "combined lse")
    assert_close(logp[kept], want_logp[kept], dtype, "combined logp")
    assert_close(entropy[kept], want_entropy[kept], dtype, "combined entropy")

    # backwards per shard with the GLOBAL lse and entropy, against fp64 autograd of the full problem
    g_logp, g_ent = coefficients(rows, device, seed + 2)
    for grad_entropy in (g_ent, None):
        x = logits.detach().double().requires_grad_(True)
        full_logp, full_entropy = eager_logprobs(x, targets, temperature, IGNORE)
        outputs, grads = [full_logp], [g_logp.double()]
        if grad_entropy is not None:
            outputs.append(full_entropy)
            grads.append(grad_entropy.double())
        (want_grad,) = torch.autograd.grad(outputs, x, grads)
        for inplace in (False, True):
            buffer = logits.clone() if inplace else logits
            parts = [kernels.token_logprobs_backward(buffer[:, a:b], local_targets(a, b, r)[0], want_lse,
                                                     want_entropy.float(), g_logp, grad_entropy, temperature,
                                                     IGNORE, inplace)
                     for r, (a, b) in enumerate(shards)]
            grad = torch.cat(parts, dim=1)
            what = f"sharded grad (entropy term: {grad_entropy is not None}, {inplace=})"
            assert_close(grad, want_grad, dtype, what)
            if inplace:  # each shard wrote its own columns of the buffer
                assert torch.equal(buffer, grad)


SHARD_CASES = {
    "native": dict(examples=25, rows=6, vocabs=(37, 129, 301, 4097 + 31)),
    "reference": dict(examples=15, rows=6, vocabs=(37, 129, 301)),
    "triton": dict(examples=6, rows=4, vocabs=(37, 129)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
def test_sharded_gradient_equals_the_full_one(backend, dtype):
    kernels, name, device = kernels_of(backend)
    space = SHARD_CASES[name]

    @settings(max_examples=space["examples"])
    @given(rows=st.integers(1, space["rows"]), vocab=st.sampled_from(space["vocabs"]),
           n_shards=st.sampled_from([2, 3]), temperature=st.sampled_from(TEMPERATURES),
           seed=st.integers(0, 2**16))
    def check(rows, vocab, n_shards, temperature, seed):
        check_sharded(kernels, device, rows, vocab, n_shards, dtype, temperature, seed)

    check()
