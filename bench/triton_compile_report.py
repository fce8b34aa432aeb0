"""GPU readiness without a GPU: compile every Triton kernel of sppo_fast/kernels/ in every launch configuration it
can use (the forward's autotune configs, the backward's tile shapes), for NVIDIA sm_80 (A100) and
sm_90a (H100/H200) and AMD gfx942 (MI300), and record registers, spills and shared memory of each.

    python bench/triton_compile_report.py            # writes bench/results/triton-compile.{json,md}
    python bench/triton_compile_report.py --check    # also exits 1 if any compiled kernel spills
    python bench/bench_triton.py --compile-only      # the same

Triton's own `n_regs`/`n_spills` exist only once a driver has loaded the binary, i.e. on a GPU. Here
the numbers come from the compilers that made the binary: ptxas's `-v` report (Triton runs ptxas with
-v and prints the report when `knobs.nvidia.dump_ptxas_log` is set), and the AMD backend's assembly
(`; NumVgprs`, `.vgpr_spill_count`, `; ScratchSize`). Shared memory is Triton's allocation
(`metadata.shared`, what a launch reserves). A spill is any spill store/load or stack (NVIDIA) or any
VGPR/SGPR spill or scratch (AMD): on these streaming kernels it would mean local-memory traffic per
element.

Each kernel is compiled per logits dtype (fp32, bf16, fp16) with its constexpr flags on (SCALE for
temperature != 1, COMPUTE_ENTROPY / HAS_GRAD_ENTROPY), with the alignment hints a real launch gets for
a vocabulary and row stride divisible by 16 (as 32000, 128256 and 151936 are: 16-byte vector loads)
and without them (an odd vocabulary such as 50257), and once with the flags off; see VARIANTS.
Pointers are always 16-byte aligned, as every PyTorch allocation is. The compile cache is bypassed
(TRITON_ALWAYS_COMPILE), so every row is a fresh compile.
"""

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TARGETS = {"sm_80": ("cuda", 80, 32), "sm_90a": ("cuda", 90, 32), "gfx942": ("hip", "gfx942", 64)}
BACKENDS = {"cuda": "nvidia", "hip": "amd"}
DTYPES = ("fp32", "bf16", "fp16")
# (logits dtype, flags on, V and strides divisible by 16). Flags on is the heavier code (measured over
# every config, dtype and target: up to 1.7x the registers of off, never more than one fewer), so
# flags off is compiled once per config; an odd vocabulary loses the vector hint and can need far more
# registers (the backward's 4096-wide bf16 tile on sm_90a: 47 aligned, 80 not).
VARIANTS = (("fp32", True, True), ("bf16", True, True), ("fp16", True, True), ("fp32", True, False),
            ("bf16", True, False), ("bf16", False, True))
POINTERS_FP32 = ("logp_ptr", "entropy_ptr", "grad_logp_ptr", "grad_entropy_ptr")


@dataclass(frozen=True)
class Case:
    """One compile: a kernel, one launch configuration, one specialization, one target."""

    kernel: str  # "forward" or "backward"
    block_v: int
    num_warps: int
    dtype: str  # the logits' (and the gradient's) element type
    flags: bool  # every constexpr flag on (SCALE, COMPUTE_ENTROPY / HAS_GRAD_ENTROPY) or off
    aligned: bool  # V and the row strides divisible by 16
    target: str
    autotune_pruned: bool = False  # a forward config the autotuner's pruning never launches


def _kernels():
    from sppo_fast.kernels import token_logprobs_backward as bwd
    from sppo_fast.kernels import token_logprobs_forward as fwd

    return fwd, bwd


def launch_configs():
    """[(kernel, BLOCK_V, num_warps, pruned)], read from the kernel modules themselves, so a config added
    there is compiled here without an edit. Needs TRITON_INTERPRET unset (else no autotuner exists)."""
    fwd, bwd = _kernels()
    autotuned = getattr(fwd._launch, "configs", None)
    if autotuned is None:
        raise RuntimeError("the forward kernel has no autotuner: TRITON_INTERPRET=1 was set before import")
    kept = fwd._prune_configs(autotuned, {"V": 1 << 20})  # the widest vocabulary: only the lane rule prunes
    out = [("forward", c.kwargs["BLOCK_V"], c.num_warps, c not in kept) for c in autotuned]
    # The backward is not autotuned: its tile follows the vocabulary; every shape it can pick is here.
    shapes = sorted({bwd._tile_shape(1 << k) for k in range(0, 21)})
    return out + [("backward", block, warps, False) for block, warps in shapes]


def all_cases(targets):
    cases = []
    for kernel, block, warps, pruned in launch_configs():
        for target in targets:
            cases += [Case(kernel, block, warps, d, f, a, target, pruned) for d, f, a in VARIANTS]
    return cases


def _signature(case):
    """(kernel fn, signature, constexprs, attrs) as the JIT would build them for this launch."""
    from sppo_fast.backends import LSE_DTYPE

    fwd, bwd = _kernels()
    fn = fwd.token_logprobs_forward_kernel if case.kernel == "forward" else bwd.token_logprobs_backward_kernel
    lse = "*fp64" if str(LSE_DTYPE) == "torch.float64" else "*fp32"
    types = {"logits_ptr": f"*{case.dtype}", "grad_ptr": f"*{case.dtype}", "targets_ptr": "*i64", "lse_ptr": lse,
             "temperature": "fp32", "inv_temperature": "fp32", **{p: "*fp32" for p in POINTERS_FP32}}
    flag_names = ("SCALE", "COMPUTE_ENTROPY") if case.kernel == "forward" else ("SCALE", "HAS_GRAD_ENTROPY")
    constexprs = {"BLOCK_V": case.block_v, **{name: case.flags for name in flag_names}}
    signature = {a: ("constexpr" if a in constexprs else types.get(a, "i32")) for a in fn.arg_names}
    divisible = [a for a in fn.arg_names if signature[a].startswith("*")]
    if case.aligned:
        divisible += ["V", "logits_row_stride", "grad_row_stride"]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible if a in fn.arg_names}
    return fn, signature, constexprs, attrs


_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads.*?"
                    r"Used (\d+) registers", re.S)


def _amd_field(asm, name):
    match = re.search(rf"{re.escape(name)}:?\s+(\d+)", asm)
    if match is None:
        raise RuntimeError(f"no {name} in the AMD assembly: the backend's report format changed")
    return int(match.group(1))


def compile_case(case):
    """A row of the report: the case, registers, spill bytes (or counts), stack/scratch, shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, signature, constexprs, attrs = _signature(case)
    backend, arch, warp_size = TARGETS[case.target]
    triton.knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget(backend, arch, warp_size), options={"num_warps": case.num_warps})
    row = dict(asdict(case), shared_bytes=int(compiled.metadata.shared))
    if backend == "cuda":
        match = _PTXAS.search(log.getvalue())
        if match is None:
            raise RuntimeError(f"no ptxas -v report for {case}: {log.getvalue()[-500:]!r}")
        stack, stores, loads, regs = map(int, match.groups())
        row.update(registers=regs, spills=stores + loads, stack_bytes=stack)
    else:
        asm = compiled.asm["amdgcn"]
        row.update(registers=_amd_field(asm, "; NumVgprs"), sgprs=_amd_field(asm, "; TotalNumSgprs"),
                   spills=_amd_field(asm, ".vgpr_spill_count") + _amd_field(asm, ".sgpr_spill_count"),
                   stack_bytes=_amd_field(asm, "; ScratchSize"), occupancy=_amd_field(asm, "; Occupancy"))
    # row * stride must be a 64-bit product even when the stride arrives as a 32-bit integer
    strides = [s for s in ("logits_row_stride", "grad_row_stride") if s in signature]
    row["int64_row_offsets"] = all(f"arith.extsi %{s} : i32 to i64" in compiled.asm["ttir"] for s in strides)
    row["compile_s"] = round(time.perf_counter() - start, 3)
    return row


def available_targets():
    """{target: None if it compiles here, else the reason it cannot}. A backend that is installed is
    tried on one small kernel: AMD's may need ROCm pieces that a machine without a GPU lacks."""
    import triton

    out = {}
    for name, (backend, _, _) in TARGETS.items():
        plugin = BACKENDS[backend]
        if plugin not in triton.backends.backends:
            out[name] = f"this Triton build has no {plugin} backend"
            continue
        try:
            compile_case(Case("backward", 512, 4, "fp32", False, True, name))
            out[name] = None
        except Exception as exc:  # reported in the results, not fatal: NVIDIA's targets are the test's
            out[name] = f"the {plugin} backend cannot compile here: {type(exc).__name__}: {str(exc)[:300]}"
    return out


def run(targets, jobs):
    """Compile every case for `targets`; rows in a stable order. Each worker process bypasses the cache."""
    cases = all_cases(targets)
    if jobs <= 1:
        return [compile_case(c) for c in cases]
    import multiprocessing

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(compile_case, cases, chunksize=4))


def summarize(rows):
    """One line per (kernel, config, target): the worst case over the specializations."""
    groups = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["block_v"], r["num_warps"], r["target"]), []).append(r)
    return [{"kernel": k, "block_v": b, "num_warps": w, "target": t, "autotune_pruned": rs[0]["autotune_pruned"],
             "variants": len(rs), "registers_min": min(r["registers"] for r in rs),
             "registers_max": max(r["registers"] for r in rs), "spills": sum(r["spills"] for r in rs),
             "stack_bytes": max(r["stack_bytes"] for r in rs), "shared_bytes": max(r["shared_bytes"] for r in rs)}
            for (k, b, w, t), rs in groups.items()]


def markdown(report):
    lines = ["# Triton kernels compiled without a GPU", "",
             f"Generated by `python bench/triton_compile_report.py` with Triton {report['triton']} "
             f"({report['wall_s']:.0f} s for {len(report['rows'])} compiles on {report['host']}, 1-minute load "
             f"average {report['load_average'][0]:.1f} before and {report['load_average'][1]:.1f} after). One line per "
             "kernel, launch configuration and target; registers are per thread (VGPRs on AMD), min-max over "
             "the specializations compiled (logits fp32/bf16/fp16, flags off/on, V divisible by 16 or not); "
             "spills and stack/scratch over all of them. Shared memory is Triton's allocation per program. "
             "Full rows: `triton-compile.json`.", ""]
    if report["skipped_targets"]:
        lines += [f"Not compiled for {name}: {why}." for name, why in report["skipped_targets"].items()] + [""]
    lines += ["| kernel | BLOCK_V | warps | target | registers | spills | stack | shared (B) | note |",
              "|---|---|---|---|---|---|---|---|---|"]
    for s in report["summary"]:
        note = "pruned by the autotuner (under 4 elements per thread)" if s["autotune_pruned"] else ""
        lines.append(f"| {s['kernel']} | {s['block_v']} | {s['num_warps']} | {s['target']} | "
                     f"{s['registers_min']}-{s['registers_max']} | {s['spills']} | {s['stack_bytes']} | "
                     f"{s['shared_bytes']} | {note} |")
    return "\n".join(lines) + "\n"


def host_name():
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", nargs="+", choices=sorted(TARGETS), default=list(TARGETS))
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                   help="compiler processes (default: one per core)")
    p.add_argument("--out", default=os.path.join(RESULTS, "triton-compile"),
                   help="path without extension: writes OUT.json and OUT.md")
    p.add_argument("--check", action="store_true", help="exit 1 if any kernel spills")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # Before triton is imported anywhere: real compiles (no interpreter), no cached binaries.
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's launch default, said aloud
    import triton

    reasons = available_targets()
    targets = [t for t in args.targets if reasons[t] is None]
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    rows = run(targets, args.jobs)
    report = {"triton": triton.__version__, "host": host_name(), "wall_s": round(time.perf_counter() - start, 1),
              "load_average": [load_before, os.getloadavg()[0]],  # other work on the machine slows compiles
              "targets": targets, "skipped_targets": {t: reasons[t] for t in args.targets if reasons[t]},
              "summary": summarize(rows), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(report))
    spilling = [r for r in rows if r["spills"] or r["stack_bytes"]]
    print(markdown(report))
    print(f"wrote {args.out}.json and {args.out}.md; {len(rows)} compiles, {len(spilling)} spill")
    return 1 if args.check and spilling else 0


if __name__ == "__main__":
    sys.exit(main())
