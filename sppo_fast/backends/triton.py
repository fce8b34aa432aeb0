"""The Triton backend (docs/api.md §7): CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.

The two functions of the backend interface (see sppo_fast.backends), each one kernel launch from
sppo_fast/kernels/: a forward that reads the logits once and a backward that reads them once and writes the
gradient once. Arguments arrive validated by the public functions (sppo_fast.api).
"""

import contextlib

import torch
import triton

from sppo_fast.kernels.token_logprobs_backward import launch_token_logprobs_backward
from sppo_fast.kernels.token_logprobs_forward import launch_token_logprobs_forward


def _on_device_of(tensor):
    """Triton launches on the current CUDA device: make it the tensor's (logits on cuda:1, say)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def token_logprobs_forward(logits, targets, temperature, ignore_index, compute_entropy,
                           lse_dtype=torch.float32):
    """The interface's forward; `lse_dtype=torch.float64` (beyond the interface, as the native backend
    has it) returns an fp64 lse, with which the backward is exact to fp32 rounding even where
    |logits| ~ 1e4 (an fp32 lse of that size is off by up to 5e-4)."""
    with _on_device_of(logits):
        return launch_token_logprobs_forward(logits, targets, temperature, ignore_index, compute_entropy,
                                             lse_dtype)


def token_logprobs_backward(logits, targets, lse, entropy, grad_logp, grad_entropy, temperature,
                            ignore_index, inplace):
    """The interface's backward; `lse` may be fp32 or fp64."""
    with _on_device_of(logits):
        return launch_token_logprobs_backward(logits, targets, lse, entropy, grad_logp, grad_entropy,
                                              temperature, ignore_index, inplace)


def describe():
    """One line for sppo_fast.backend_info()."""
    mode = "interpreter (TRITON_INTERPRET=1)" if triton.knobs.runtime.interpret else "compiled"
    return f"triton {triton.__version__}, {mode}"


accumulate_weight_grad = None  # no weight-gradient product of its own: the linear path uses torch's
token_logprobs_forward_basis = None  # no one-pass forward: the logits path takes two passes (plan.logits_one_pass)
token_logprobs_backward_from_basis_ = None
