"""Which kernel serves a tensor (docs/api.md §7): Triton on CUDA, the native C++ kernels on CPU, the eager
reference where neither can (with a warning, once). `SPPO_FAST_BACKEND=triton|native|reference`
or `use_backend(name)` forces one."""

import contextlib
import functools
import importlib
import os
import warnings

import torch

BACKENDS = ("triton", "native", "reference")
_override = None
_warned = set()


@functools.cache
def load(name):
    """(module, None) for a backend that imports, else (None, why not)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {list(BACKENDS)}")
    try:
        return importlib.import_module(f"sppo_fast.backends.{name}"), None
    except Exception as exc:  # an import failure of an optional backend is reported, not raised
        return None, f"{type(exc).__name__}: {exc}"


def _triton_serves(device):
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _unavailable(name, device):
    """Why `name` cannot serve `device`, or None if it can."""
    module, why = load(name)
    if module is None:
        return why
    if name == "triton" and not _triton_serves(device):
        return f"Triton runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), not {device.type}"
    if name == "native" and device.type != "cpu":
        return f"the native kernels run CPU tensors, not {device.type}"
    return None


def forced_backend():
    name = _override or os.environ.get("SPPO_FAST_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"SPPO_FAST_BACKEND={name!r} is not a backend; choose one of {list(BACKENDS)}")
    return name


def choose(device):
    """(backend name, reason) for a device, without side effects."""
    device = torch.device(device)
    forced = forced_backend()
    if forced is not None:
        return forced, "forced by SPPO_FAST_BACKEND or use_backend()"
    preferred = {"cuda": "triton", "cpu": "native"}.get(device.type)
    if preferred is None:
        return "reference", f"no kernel for {device.type} tensors"
    why = _unavailable(preferred, device)
    if why is None:
        return preferred, "default for this device"
    return "reference", f"the {preferred} backend is unavailable ({why})"


def backend_for(device, dtype=None):
    """The backend module serving `device`; warns once when the eager reference stands in. fp64 tensors
    (the oracle's) are served by the reference, in fp64, whatever the device."""
    if dtype == torch.float64:
        return load("reference")[0]
    name, reason = choose(device)
    why = _unavailable(name, torch.device(device))
    if why is not None:
        raise RuntimeError(f"backend {name!r} was forced but cannot serve {torch.device(device)} tensors: {why}")
    if name == "reference" and reason != "forced by SPPO_FAST_BACKEND or use_backend()":
        key = torch.device(device).type
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"sppo_fast: the eager reference serves {key} tensors: {reason}", stacklevel=3)
    return load(name)[0]


@contextlib.contextmanager
def use_backend(name):
    """Force a backend within a block (tests compare backends this way)."""
    global _override
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {list(BACKENDS)}")
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous


def backend_info():
    """Which kernel serves each device, and why: {"cpu": "...", "cuda": "..."}."""
    info = {}
    for device in ("cpu", "cuda"):
        name, reason = choose(device)
        why = _unavailable(name, torch.device(device))
        if why is not None:
            info[device] = f"{name}: forced, but unavailable ({why})"
            continue
        detail = ""
        module = load(name)[0]
        if hasattr(module, "describe"):
            detail = f" [{module.describe()}]"
        info[device] = f"{name}{detail}: {reason}"
    if not torch.cuda.is_available():
        info["cuda"] += " (no CUDA device on this machine)"
    return info
