"""sppo_fast.integrations.grad_accumulation: the lm_head's and the embedding's gradients added straight
into `.grad` equal what autograd accumulates (docs/api.md §5 against fp64), and the by-hand path is refused
or skipped wherever a hook, a dtype or a wrapper would make it differ."""

import pytest
import torch
from spec_helpers import assert_spec_close, eager_logprobs

from sppo_fast.integrations.grad_accumulation import (
    accumulate_embedding_grad_into_grad,
    accumulation_is_safe,
    head_logprobs,
)


def _problem(n=37, hidden=24, vocab=1003, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * 0.4
    b = torch.randn(vocab, generator=g, dtype=torch.float64) * 0.1
    t = torch.randint(0, vocab, (n,), generator=g)
    t[[3, 11]] = -100
    coef = torch.randn(2, n, generator=g, dtype=torch.float64)
    return h, w, b, t, coef


def _grads(fn, h, w, b, t, coef, dtype, prior):
    """d(sum c1 logp + c2 entropy) wrt hidden, weight, bias, accumulated onto `prior` in .grad."""
    hidden = h.detach().to(dtype).requires_grad_(True)
    weight, bias = torch.nn.Parameter(w.to(dtype)), torch.nn.Parameter(b.to(dtype))
    weight.grad, bias.grad = prior[0].to(dtype).clone(), prior[1].to(dtype).clone()
    logp, entropy = fn(hidden, weight, bias, t)
    ((logp * coef[0].to(dtype)).sum() + (entropy * coef[1].to(dtype)).sum()).backward()
    return logp, entropy, hidden.grad, weight.grad, bias.grad


def _eager(hidden, weight, bias, t):
    return eager_logprobs((hidden @ weight.T + bias) / 0.7, t)


@pytest.mark.parametrize("chunk_size", [None, 8])
def test_head_logprobs_into_grad_meets_the_spec_bound(chunk_size):
    h, w, b, t, coef = _problem()
    prior = (torch.randn_like(w), torch.randn_like(b))  # .grad already holds an earlier micro-batch's

    def ours(hidden, weight, bias, t):
        return head_logprobs(hidden, weight, t, bias=bias, temperature=0.7, chunk_size=chunk_size,
                             accumulate_into_grad=True)

    oracle = _grads(_eager, h, w, b, t, coef, torch.float64, prior)
    eager = _grads(_eager, h, w, b, t, coef, torch.float32, prior)
    got = _grads(ours, h, w, b, t, coef, torch.float32, prior)
    for name, x, e, o in zip(("logp", "entropy", "hidden", "weight", "bias"), got, eager, oracle):
        assert_spec_close(x, e, o, torch.float32, name)


def test_weight_grad_allocated_when_absent_and_frozen_bias_untouched():
    h, w, b, t, _ = _problem(vocab=300)
    weight = torch.nn.Parameter(w.float())
    bias = torch.nn.Parameter(b.float(), requires_grad=False)
    logp, _ = head_logprobs(h.float(), weight, t, bias=bias, accumulate_into_grad=True)
    logp.sum().backward()
    ref_w = torch.nn.Parameter(w.float())
    ref_logp, _ = head_logprobs(h.float(), ref_w, t, bias=bias)
    ref_logp.sum().backward()
    torch.testing.assert_close(weight.grad, ref_w.grad, rtol=1e-5, atol=1e-6)
    assert bias.grad is None


def test_unsafe_weights_are_detected_and_refused():
    w = torch.nn.Parameter(torch.randn(10, 4))
    assert accumulation_is_safe(w)
    assert not accumulation_is_safe(torch.nn.Parameter(torch.randn(10, 4, dtype=torch.bfloat16)))
    assert not accumulation_is_safe(torch.randn(10, 4, requires_grad=True))  # not a Parameter
    assert not accumulation_is_safe(torch.nn.Parameter(torch.randn(10, 4), requires_grad=False))
    hooked = torch.nn.Parameter(torch.randn(10, 4))
    hooked.register_hook(lambda g: g)
    assert not accumulation_is_safe(hooked)
    with pytest.raises(ValueError, match="accumulate_into_grad"):
        head_logprobs(torch.randn(3, 4), hooked, torch.tensor([1, 2, 3]), accumulate_into_grad=True)
    with pytest.raises(ValueError, match="targets"):
        head_logprobs(torch.randn(3, 4), w, torch.tensor([1, 2, 10]), accumulate_into_grad=True)


def _embedding_grads(patch, tied_head, hook=False):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 8, padding_idx=0)
    if patch:
        assert accumulate_embedding_grad_into_grad(emb)
    if hook:
        emb.weight.register_hook(lambda g: g * 2)
    ids = torch.tensor([[0, 0, 3, 7, 3], [1, 2, 3, 4, 49]])
    x = emb(ids)
    loss = (x ** 2).sum()
    if tied_head:  # the same weight as the output projection, as with tie_word_embeddings
        logp, _ = head_logprobs(x.reshape(-1, 8), emb.weight, ids.reshape(-1), accumulate_into_grad=patch)
        loss = loss + logp.sum()
    loss.backward()
    return emb.weight.grad


@pytest.mark.parametrize("tied_head", [False, True])
def test_embedding_into_grad_equals_autograd(tied_head):
    got, ref = _embedding_grads(True, tied_head), _embedding_grads(False, tied_head)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    if not tied_head:  # the padding row gets no embedding gradient (the head's softmax does reach it)
        assert torch.count_nonzero(got[0]) == 0


def test_patched_embedding_falls_back_when_hooked():
    got, ref = _embedding_grads(True, False, hook=True), _embedding_grads(False, False, hook=True)
    torch.testing.assert_close(got, ref)  # the hook (doubling) ran: autograd's own path served
    assert not accumulate_embedding_grad_into_grad(torch.nn.Embedding(5, 2, max_norm=1.0))
