"""GPU readiness without a GPU (what the interpreter cannot show): every Triton kernel of sppo_fast/kernels/, in
every launch configuration it can use, passes Triton's compiler down to a cubin for sm_80 and sm_90a
(and an hsaco for AMD gfx942), without register spills, with 64-bit row offsets; and the recorded
report bench/results/triton-compile.{json,md} is the one this code produces.

The compiles run in bench/triton_compile_report.py, in a child process: the test session has set
TRITON_INTERPRET=1 (tests/conftest.py) before triton was imported, and compiled kernels need it unset."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "triton_compile_report.py"
RECORDED = ROOT / "bench" / "results" / "triton-compile.json"
# What identifies a row, and what the compilers measured in it (compile_s is wall time: not compared).
KEY = ("kernel", "block_v", "num_warps", "dtype", "flags", "aligned", "target")
MEASURED = ("registers", "spills", "stack_bytes", "shared_bytes")

triton = pytest.importorskip("triton")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    out = tmp_path_factory.mktemp("triton-compile") / "report"
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, TRITON_INTERPRET="0"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out.parent / "report.md").read_text().startswith("# Triton kernels compiled without a GPU")
    return json.loads((out.parent / "report.json").read_text())


def _expected_tiles():
    """(forward (BLOCK_V, warps) set, backward BLOCK_V set) from the modules' constants, not from the
    autotuner object and tile function the script reads, so a config it failed to pick up shows."""
    from sppo_fast.kernels import token_logprobs_backward as bwd
    from sppo_fast.kernels import token_logprobs_forward as fwd

    forward = {(b, w) for b in fwd.GPU_BLOCK_SIZES for w in fwd.GPU_NUM_WARPS}
    backward = {1 << k for k in range(bwd.GPU_MIN_BLOCK_V.bit_length() - 1, bwd.GPU_MAX_BLOCK_V.bit_length())}
    return forward, backward


def test_every_kernel_and_config_compiles_for_every_target(report):
    # NVIDIA's targets must compile; AMD's is compiled where its backend can without a device, and
    # otherwise listed with the reason.
    assert {"sm_80", "sm_90a"} <= set(report["targets"]), report["skipped_targets"]
    assert set(report["targets"]) | set(report["skipped_targets"]) == {"sm_80", "sm_90a", "gfx942"}
    assert all(report["skipped_targets"].values())
    expected_targets = set(report["targets"])
    forward, backward = _expected_tiles()
    for target in expected_targets:
        rows = [r for r in report["rows"] if r["target"] == target]
        assert {(r["block_v"], r["num_warps"]) for r in rows if r["kernel"] == "forward"} == forward, target
        assert {r["block_v"] for r in rows if r["kernel"] == "backward"} == backward, target
    variants = {}
    for r in report["rows"]:
        variants.setdefault((r["kernel"], r["block_v"], r["num_warps"], r["target"]), set()).add(
            (r["dtype"], r["flags"], r["aligned"]))
    for config, seen in variants.items():  # every dtype, flags on and off, V aligned to 16 and not
        assert {d for d, _, _ in seen} == {"fp32", "bf16", "fp16"}, config
        assert {f for _, f, _ in seen} == {a for _, _, a in seen} == {False, True}, config


def test_no_config_spills_and_row_offsets_are_64_bit(report):
    spilling = [{k: r[k] for k in KEY + MEASURED} for r in report["rows"] if r["spills"] or r["stack_bytes"]]
    assert not spilling, f"register spills (fix the config, see sppo_fast/kernels/): {spilling}"
    narrow = [{k: r[k] for k in KEY} for r in report["rows"] if not r["int64_row_offsets"]]
    assert not narrow, f"row * stride computed in 32 bits: {narrow}"
    assert all(r["registers"] > 0 for r in report["rows"]), "a register count was not read"


SPILLING = """
import triton_compile_report as report
row = report.compile_case(report.Case("forward", 8192, 1, "fp32", True, True, "sm_90a"))
print(row["spills"], row["stack_bytes"])
"""


def test_a_spilling_config_is_caught():
    """The detector itself: one warp for an 8192-wide tile (256 elements per thread) spills on sm_90a."""
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    # PYTHONPATH, not the working directory: run.sh sets PYTHONSAFEPATH, which keeps `-c` from importing from it
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_ALWAYS_COMPILE="1", TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=str(SCRIPT.parent))
    done = subprocess.run([sys.executable, "-c", SPILLING], cwd=SCRIPT.parent, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    spills, stack = map(int, done.stdout.split())
    assert spills > 0 and stack > 0


def test_the_recorded_report_is_this_code_s(report):
    """bench/results/triton-compile.json lists the same compiles; under the same Triton (hence the same
    ptxas and LLVM) it has the same registers, spills and shared memory, since compiles are
    deterministic. A change to a kernel or a config must come with a re-run of the script."""
    recorded = json.loads(RECORDED.read_text())
    ours = {tuple(r[k] for k in KEY): r for r in report["rows"]}
    theirs = {tuple(r[k] for k in KEY): r for r in recorded["rows"] if r["target"] in report["targets"]}
    stale = "re-run `python bench/triton_compile_report.py` and commit bench/results/triton-compile.*"
    assert set(ours) == set(theirs), stale
    if recorded["triton"] != report["triton"]:
        pytest.skip(f"recorded with Triton {recorded['triton']}, this is {report['triton']}: counts may differ")
    differ = [k for k in ours if any(ours[k][m] != theirs[k][m] for m in MEASURED)]
    assert not differ, f"{stale}; these rows changed: {differ[:5]}"
