"""Argument checks shared by the public functions: each error names the argument and says what was
expected, and every check runs before any kernel does (docs/api.md §6)."""

import torch

_FLOAT_LOGITS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def check_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_float(name, x):
    check_tensor(name, x)
    if x.dtype not in _FLOAT_LOGITS:
        raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16 or float16), got {x.dtype}")
    return x


def check_integer(name, x):
    check_tensor(name, x)
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (e.g. torch.long), got {x.dtype}")
    return x


def check_shape(name, x, shape, what=""):
    if tuple(x.shape) != tuple(shape):
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {tuple(shape)}{extra}, got {tuple(x.shape)}")
    return x


def check_same_device(**tensors):
    present = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {where}; move them with .to(device)")


def check_temperature(temperature):
    if isinstance(temperature, torch.Tensor) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a Python float, got {type(temperature).__name__}")
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return float(temperature)


def check_targets_range(targets, vocab_size, ignore_index, name="targets"):
    """A target outside [0, V) that is not ignore_index would read out of bounds in a kernel. The
    check reads the tensor (a device sync), so it is skipped while torch.compile traces."""
    if _compiling() or targets.numel() == 0:
        return
    bad = ((targets < 0) | (targets >= vocab_size)) & (targets != ignore_index)
    if bool(bad.any()):
        value = int(targets[bad][0])
        raise ValueError(f"{name} must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}, "
                         f"found {value}")


def check_logits_and_targets(logits, targets, temperature, ignore_index, *, logits_name="logits"):
    check_float(logits_name, logits)
    check_integer("targets", targets)
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if logits.dim() < 1:
        raise ValueError(f"{logits_name} must have at least one dimension (..., V), got a scalar")
    check_shape("targets", targets, logits.shape[:-1], f"the leading shape of {logits_name} (..., V)")
    check_same_device(**{logits_name: logits, "targets": targets})
    temperature = check_temperature(temperature)
    check_targets_range(targets, logits.shape[-1], ignore_index)
    return temperature
