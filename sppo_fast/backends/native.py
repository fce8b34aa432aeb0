"""The native CPU backend: the C++ kernels of csrc/ (one build per ISA, the best one the CPU runs).

Importing this module raises ImportError, with the reason in its message, when no build of the
extension can be loaded (no compiler at install time, `SPPO_FAST_NO_NATIVE=1`, a torch ABI mismatch);
`sppo_fast.dispatch` catches it and reports the reason in `backend_info()`. When it imports, it
serves CPU tensors through the two functions of the backend interface (`sppo_fast.backends`).

Which build: setup.py compiles csrc/ as sppo_fast._C (ATen's DEFAULT capability, runs anywhere),
sppo_fast._C_avx2 and sppo_fast._C_avx512. The one chosen is the widest that ATen itself would use on
this CPU (`torch.backends.cpu.get_cpu_capability()`, which honours `ATEN_CPU_CAPABILITY`).
"""

import importlib

import torch

# ATen capability -> builds that may serve it, widest first.
_BUILDS_FOR_CAPABILITY = {
    "AVX512": ("_C_avx512", "_C_avx2", "_C"),
    "AVX2": ("_C_avx2", "_C"),
}


def _load_extension():
    """(module, None) for the widest build this CPU runs, or (None, why none could be loaded)."""
    capability = torch.backends.cpu.get_cpu_capability()
    failures = []
    for name in _BUILDS_FOR_CAPABILITY.get(capability, ("_C",)):
        try:
            return importlib.import_module(f"sppo_fast.{name}"), None
        except ImportError as exc:
            failures.append(f"sppo_fast.{name}: {exc}")
    return None, "; ".join(failures)


_C, _why = _load_extension()
if _C is None:
    raise ImportError(
        "the native CPU kernels are not built (the package's install compiles csrc/ when a C++ "
        f"compiler is found; reinstall with one, e.g. `pip install --no-build-isolation -e .`): {_why}")

CPU_CAPABILITY = _C.CPU_CAPABILITY


def describe():
    """One line for backend_info(): which build of the kernels runs."""
    return f"csrc/ C++ kernels, {CPU_CAPABILITY} build ({_C.__name__})"


def cached_buffer_bytes():
    """Bytes held by freed gradient buffers that the backward keeps for reuse (csrc/buffer_pool.cpp)."""
    return _C.pool_cached_bytes()


def release_cached_buffers():
    """Frees those buffers; returns the bytes freed."""
    return _C.pool_release()


def token_logprobs_forward(logits, targets, temperature, ignore_index, compute_entropy,
                           lse_dtype=torch.float32):
    """The interface's forward; `lse_dtype=torch.float64` (beyond the interface, as the Triton
    launcher has it) returns an fp64 lse, with which the backward is exact to fp32 rounding even
    where |logits| ~ 1e4 (an fp32 lse of that size is off by up to 5e-4)."""
    return _C.token_logprobs_forward(logits, targets, float(temperature), int(ignore_index),
                                     bool(compute_entropy), lse_dtype == torch.float64)


def token_logprobs_backward(logits, targets, lse, entropy, grad_logp, grad_entropy, temperature,
                            ignore_index, inplace):
    """The interface's backward; `lse` may be fp32 or fp64."""
    return _C.token_logprobs_backward(logits, targets, lse, entropy, grad_logp, grad_entropy,
                                      float(temperature), int(ignore_index), bool(inplace))


def token_logprobs_forward_basis(logits, targets, temperature, ignore_index, compute_entropy):
    """The interface's one-pass forward: (logp, entropy, lse fp64, basis = d logp / d logits)."""
    return _C.token_logprobs_forward_basis(logits, targets, float(temperature), int(ignore_index),
                                           bool(compute_entropy))


# the interface's one-pass backward: basis *= grad_logp row by row, in place
token_logprobs_backward_from_basis_ = _C.token_logprobs_backward_from_basis_


# accumulate_weight_grad(accumulator, grad_logits, hidden, accumulate) of the backend interface where the
# CPU has AVX512-BF16 (csrc/weight_grad_bf16.cpp), else None
accumulate_weight_grad = _C.accumulate_weight_grad_bf16 if _C.weight_grad_bf16_supported() else None
