"""Test set-up: without a GPU the Triton kernels run through the interpreter on CPU tensors, which
must be chosen before triton is first imported."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile("ci")

from sppo_fast import dispatch  # noqa: E402

ALL_BACKENDS = ("reference", "native", "triton")


def _device_for(name):
    return "cuda" if name == "triton" and torch.cuda.is_available() else "cpu"


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    """Runs a test once per kernel backend that can serve here; yields (name, device)."""
    name = request.param
    device = torch.device(_device_for(name))
    why = dispatch._unavailable(name, device)
    if why is not None:
        if name == "native" and os.environ.get("CI"):
            pytest.fail(f"the native CPU kernels must be built in CI: {why}")
        pytest.skip(f"backend {name} unavailable: {why}")
    with dispatch.use_backend(name):
        yield name, device
