"""The policy loss of the update step, five ways (`--loss_impl`), all from the decoder's hidden states:

  fused_linear  `fused_linear_policy_loss`: hidden x lm_head chunk by chunk, the logits never exist whole
  fused         the logits materialised by one matmul, then `fused_policy_loss` on them
  eager         the idiomatic PyTorch loss: logits, log_softmax + gather in fp32, entropy, then
                `policy_loss` on the (B, T) results
  compile       `torch.compile` of that eager loss
  torch_lce     PyTorch 2.13's chunked `F.linear_cross_entropy(..., reduction="none")`: per-token
                log-probs from the hidden states without the whole logits, then `policy_loss`. It gives
                no entropy: the entropy metric is missing, and losses that need the entropy (SSPO's
                entropy-adaptive clip, an entropy bonus) are refused.

Same loss and gradients (tests/test_long_cot.py); they differ in memory and time, which is what
`bench/bench_long_cot.py` measures.
"""

from __future__ import annotations

import subprocess

import torch
import torch.nn.functional as F

import sppo_fast
from sppo_fast.trainer.config import LOSS_IMPLS


def eager_policy_loss(hidden, weight, bias, targets, old_logp, advantages, mask, config, segment_ids=None,
                      ref_logp=None, temperature=1.0, normalizer=None):
    """What one writes without the library's fused ops: full logits, fp32 log-softmax, gather, entropy."""
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # fp32 at least
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return sppo_fast.policy_loss(logp, old_logp, advantages, mask, config, segment_ids=segment_ids,
                                 entropy=entropy, ref_logp=ref_logp, normalizer=normalizer)


_compiled = None


def compiled_policy_loss(*args, **kwargs):
    global _compiled
    if _compiled is None:  # one compiled function for the process: recompiles follow shapes, not calls
        _compiled = torch.compile(eager_policy_loss)
    return _compiled(*args, **kwargs)


def torch_lce_options(chunk_size=None):
    """`torch.nn.LinearCrossEntropyOptions`: torch's defaults ("auto": per device and dtype, on CPU fp32
    "compact" with rows per chunk from "aspect_ratio:2", bf16 "accurate" with "aspect_ratio"), or
    `chunk_size` rows per chunk with the same automatic precision policy."""
    return torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk_size)


def torch_lce_logprobs(hidden, weight, targets, bias=None, *, temperature=1.0, ignore_index=-100, options=None,
                       chunk_size=None):
    """Per-token log-probs (..., T) of `targets` from hidden states (..., H) and the output layer (V, H):
    minus PyTorch 2.13's chunked `F.linear_cross_entropy(reduction="none")`, fp32 at least (torch returns
    the hidden states' dtype). `options` (a LinearCrossEntropyOptions) default to
    `torch_lce_options(chunk_size)`. Positions whose target is `ignore_index` get 0."""
    if options is None:
        options = torch_lce_options(chunk_size)
    if temperature != 1.0:  # (h W^T + b) / T = (h / T) W^T + b / T: the logits are never formed
        hidden = hidden / temperature
        bias = None if bias is None else bias / temperature
    shape = targets.shape
    nll = F.linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                 linear_bias=bias, reduction="none", ignore_index=ignore_index, options=options)
    return -nll.view(shape).to(torch.promote_types(nll.dtype, torch.float32))


def torch_lce_policy_loss(hidden, weight, bias, targets, old_logp, advantages, mask, config, segment_ids=None,
                          ref_logp=None, temperature=1.0, normalizer=None, chunk_size=None, options=None):
    """`torch_lce_logprobs`, then `policy_loss` on them (no entropy)."""
    if config.entropy_adaptive is not None or config.entropy_coef:
        raise ValueError("loss_impl torch_lce: F.linear_cross_entropy gives no entropy, which this loss needs "
                         "(entropy_adaptive or entropy_coef); use fused_linear")
    logp = torch_lce_logprobs(hidden, weight, targets, bias, temperature=temperature, options=options,
                              chunk_size=chunk_size)
    return sppo_fast.policy_loss(logp, old_logp, advantages, mask, config, segment_ids=segment_ids,
                                 ref_logp=ref_logp, normalizer=normalizer)


def policy_loss_from_hidden(impl, hidden, weight, bias, targets, old_logp, advantages, mask, config, *,
                            segment_ids=None, ref_logp=None, temperature=1.0, normalizer=None,
                            chunk_size=None):
    """The policy loss of `impl` on hidden states (B, T, H) and the output layer (weight (V, H), bias).
    `chunk_size`: rows per chunk of fused_linear and of torch_lce (None: each one's own choice)."""
    common = dict(segment_ids=segment_ids, ref_logp=ref_logp, temperature=temperature, normalizer=normalizer)
    if impl == "fused_linear":
        return sppo_fast.fused_linear_policy_loss(hidden, weight, targets, old_logp, advantages, mask, config,
                                                  bias=bias, chunk_size=chunk_size, **common)
    if impl == "fused":
        logits = F.linear(hidden, weight, bias)
        return sppo_fast.fused_policy_loss(logits, targets, old_logp, advantages, mask, config, **common)
    if impl == "eager":
        return eager_policy_loss(hidden, weight, bias, targets, old_logp, advantages, mask, config, **common)
    if impl == "compile":
        return compiled_policy_loss(hidden, weight, bias, targets, old_logp, advantages, mask, config, **common)
    if impl == "torch_lce":
        return torch_lce_policy_loss(hidden, weight, bias, targets, old_logp, advantages, mask, config,
                                     chunk_size=chunk_size, **common)
    raise ValueError(f"loss_impl: unknown {impl!r}; choose one of {', '.join(LOSS_IMPLS)}")


def check_loss_impl(impl: str, device: torch.device):
    """Raise a ValueError before any training when `impl` cannot run on `device`: torch.compile needs
    TorchDynamo on this Python, and Inductor needs a working C++ compiler on CPU or Triton on a GPU.
    Finding out at the first update step would waste the warm start and the first rollouts."""
    if impl not in LOSS_IMPLS:
        raise ValueError(f"loss_impl: unknown {impl!r}; choose one of {', '.join(LOSS_IMPLS)}")
    if impl != "compile":
        return
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            raise RuntimeError("TorchDynamo does not support this Python")
        if device.type == "cuda":
            from torch.utils._triton import has_triton

            if not has_triton():
                raise RuntimeError("Triton is not installed")
        else:
            from torch._inductor.cpp_builder import get_cpp_compiler

            subprocess.run([get_cpp_compiler(), "--version"], check=True, capture_output=True, timeout=60)
    except Exception as error:  # noqa: BLE001 - every failure means the same thing to the user
        raise ValueError(f"loss_impl: compile cannot run on {device.type}: {type(error).__name__}: {error}; "
                         "use fused_linear, fused or eager") from None
