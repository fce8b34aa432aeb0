"""Argument checks of the public functions: each error names the argument and says what was expected,
and every check runs before any kernel does (docs/api.md §6). Checks that read tensor values are
collected in a `ValueChecks` and run together: one device sync per call, however many there are."""

import numbers

import torch

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def check_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_float(name, x):
    check_tensor(name, x)
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16, float16 or float64), "
                        f"got {x.dtype}")
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


def check_number(name, value, *, integer=False):
    """A real Python number (or numpy scalar), not a bool, a string or a tensor; returned as float/int."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an int" if integer else "a real number"
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    return int(value) if integer else float(value)


def check_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def check_one_pass(one_pass):
    """fused_policy_loss's one_pass: None (the plan decides), True or False."""
    if one_pass is not None and not isinstance(one_pass, bool):
        raise TypeError(f"one_pass must be None (automatic), True or False, got {type(one_pass).__name__}")
    return one_pass


def check_temperature(temperature):
    if isinstance(temperature, (bool, torch.Tensor)) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a Python float, got {type(temperature).__name__}")
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return float(temperature)


def check_chunk_size(chunk_size):
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


class ValueChecks:
    """Checks that read tensor values, run together by `run()`: one device sync for all of them. Each is
    a 0-dim bool tensor that is True when the input is bad and a function that builds the error (it may
    read the tensor again: only on the error path). Skipped while torch.compile traces."""

    def __init__(self):
        self._checks = []

    def add(self, bad, error):
        if not _compiling():
            self._checks.append((bad, error))

    def run(self):
        if not self._checks:
            return
        flags = torch.stack([bad for bad, _ in self._checks]).tolist()
        for flag, (_, error) in zip(flags, self._checks):
            if flag:
                raise error()


def check_targets_range(checks, targets, vocab_size, ignore_index, name="targets"):
    """A target outside [0, V) that is not ignore_index would read out of bounds in a kernel."""
    if targets.numel() == 0:
        return
    bad = ((targets < 0) | (targets >= vocab_size)) & (targets != ignore_index)

    def error():
        return ValueError(f"{name} must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}, "
                          f"found {int(targets[bad][0])}")

    checks.add(bad.any(), error)


def _check_targets_shape(targets, lead, x_name, packed):
    """targets of shape `lead` (x's leading shape); packed, (N,) or (1, N) for N rows."""
    if packed and targets.dim() in (1, 2) and targets.shape[-1] == lead.numel() and targets.numel() == lead.numel():
        return
    check_shape("targets", targets, lead, f"the leading shape of {x_name} (..., {'V' if x_name == 'logits' else 'H'})")


def check_logits_and_targets(checks, logits, targets, temperature, ignore_index, *, packed=False, check_range=True):
    """logits (..., V) and targets (...); returns the temperature as a float. `check_range=False`: V is
    this rank's shard of the vocabulary, the targets are checked against the whole V later."""
    check_float("logits", logits)
    check_integer("targets", targets)
    check_int("ignore_index", ignore_index)
    if logits.dim() < 1:
        raise ValueError("logits must have at least one dimension (..., V), got a scalar")
    if logits.shape[-1] == 0 and logits.shape[:-1].numel() > 0:
        raise ValueError(f"logits has an empty vocabulary dimension: shape {tuple(logits.shape)}")
    _check_targets_shape(targets, logits.shape[:-1], "logits", packed)
    check_same_device(logits=logits, targets=targets)
    if check_range:
        check_targets_range(checks, targets, logits.shape[-1], ignore_index)
    return check_temperature(temperature)


def check_linear(checks, hidden, weight, bias, targets, temperature, ignore_index, chunk_size, *, packed=False,
                 check_range=True):
    """hidden (..., H), weight (V, H), bias (V,) or None, targets (...); returns the temperature
    (`check_range` as in check_logits_and_targets)."""
    check_float("hidden", hidden)
    check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (V, H), got {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden must have shape (..., H) with H = weight.shape[1] = {weight.shape[1]}, "
                         f"got {tuple(hidden.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if bias is not None:
        check_shape("bias", check_float("bias", bias), weight.shape[:1], "one entry per row of weight (V,)")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias ({bias.dtype}) and weight ({weight.dtype}) must share a dtype")
    check_chunk_size(chunk_size)
    check_integer("targets", targets)
    _check_targets_shape(targets, hidden.shape[:-1], "hidden", packed)
    check_int("ignore_index", ignore_index)
    check_same_device(hidden=hidden, weight=weight, bias=bias, targets=targets)
    if check_range:
        check_targets_range(checks, targets, weight.shape[0], ignore_index)
    return check_temperature(temperature)
