"""Comparisons of docs/api.md §5: the error of a fused op against fp64 must not exceed the error of the same
computation in eager PyTorch at the input dtype, plus 1e-5 (fp32) or 1e-2 (bf16/fp16)."""

import torch

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-12}


def max_error(x, oracle):
    """Max abs error over finite oracle entries; infinities and NaNs must coincide exactly."""
    x, oracle = x.detach().double(), oracle.detach().double()
    assert x.shape == oracle.shape, (x.shape, oracle.shape)
    assert torch.equal(torch.isnan(x), torch.isnan(oracle)), "NaN positions differ"
    inf = torch.isinf(oracle)
    assert torch.equal(x[inf], oracle[inf]), "infinite entries differ"
    finite = torch.isfinite(oracle)
    assert torch.isfinite(x[finite]).all(), "a finite expected value came out non-finite"
    return (x[finite] - oracle[finite]).abs().max().item() if finite.any() else 0.0


def assert_spec_close(ours, eager, oracle, dtype, what=""):
    err, eager_err = max_error(ours, oracle), max_error(eager, oracle)
    bound = eager_err + TOLERANCE[dtype]
    assert err <= bound, f"{what}: error {err:.3g} vs fp64 exceeds eager {dtype} error {eager_err:.3g} + tol"


def eager_logprobs(logits, targets, temperature=1.0, ignore_index=-100):
    """Plain PyTorch at the logits' dtype: what a user would write without this library."""
    z = logits / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    ignored = targets == ignore_index
    safe = torch.where(ignored, torch.zeros_like(targets), targets)
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    entropy = -(p * torch.where(p > 0, logp_all, torch.zeros_like(p))).sum(-1)
    zero = torch.zeros_like(logp)
    return torch.where(ignored, zero, logp), torch.where(ignored, zero, entropy)
