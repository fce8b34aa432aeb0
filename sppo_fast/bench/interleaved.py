"""Implementations side by side in one process, interleaved: each round runs every implementation once,
forward + backward, so a machine whose speed drifts slows them all alike. (bench_ops runs each
implementation in a child of its own, minutes apart: on the 2-core AMD EPYC VM the same row's CPU time
differed by up to 1.4x between runs of one day, with no stolen time or other process to flag.) For each
implementation: the median wall and CPU time over the rounds, and the median over the rounds of its time
over the first implementation's in the same round, the figure to quote. No memory column: one process
cannot attribute it (bench_ops measures memory, each implementation in a fresh child).

    python bench/bench_interleaved.py --shape bf16:151936 --impls sppo_fast torch_lce:256 torch_lce:1024 cce

Implementations are those of bench_ops (sppo_fast.bench.ops.build_fn) for `--op`; `torch_lce:ROWS` is
PyTorch 2.13's chunked F.linear_cross_entropy with ROWS rows per chunk and the policy torch_lce_tuned
uses for the dtype. Results: bench/results/interleaved-<machine>.{md,json}, each run appended."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from . import harness, ops


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", choices=ops.OPS, default="fused_linear", help="the op (default: fused_linear)")
    p.add_argument("--preset", choices=ops.PRESETS, default="dapo", help="the loss preset of the op (default: dapo)")
    p.add_argument("--shape", default="bf16:151936", help="dtype:vocab (default: bf16:151936)")
    p.add_argument("--hidden", type=int, default=512, help="H of the linear op (default: 512)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per call (default: 2048)")
    p.add_argument("--impls", nargs="+", default=["sppo_fast", "torch_lce:256", "cce"],
                   help="implementations, the first the reference of the ratios (default: sppo_fast torch_lce:256 cce)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: 1)")
    p.add_argument("--out", default=None, help="results JSON (default: bench/results/interleaved-<machine>.json)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        p.error("--rounds must be >= 1 and --warmup >= 0")
    dtype, _, vocab = args.shape.partition(":")
    if dtype not in ("fp32", "bf16") or not vocab.isdigit() or int(vocab) < 1:
        p.error(f"--shape {args.shape!r}: expected dtype:vocab with dtype fp32 or bf16, e.g. bf16:151936")
    return args


def implementation(op, name, preset, dtype):
    """fn(x, inp) -> scalar loss for one name of --impls."""
    if name.startswith("torch_lce:"):
        rows = name.partition(":")[2]
        if op != "fused_linear" or not rows.isdigit() or int(rows) < 1:
            raise SystemExit(f"--impls {name!r}: torch_lce:ROWS takes a positive row count, with --op fused_linear")
        options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=int(rows), acc_policy=ops.LCE_POLICY[dtype])
        return ops.build_fn(op, "torch_lce", preset, options)
    try:
        return ops.build_fn(op, name, preset)
    except ValueError as exc:
        raise SystemExit(f"--impls {name!r}: {exc}") from None


def run(args):
    """The report of one run: every implementation's times, round by round."""
    dtype_name, vocab = args.shape.split(":")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    inp = ops.make_inputs(args.tokens, int(vocab), dtype, hidden=args.hidden if args.op == "fused_linear" else None)
    fns = {name: implementation(args.op, name, args.preset, dtype_name) for name in args.impls}
    times = {name: [] for name in fns}
    losses = {}
    for r in range(args.warmup + args.rounds):
        for name, fn in fns.items():
            if args.op == "fused_linear":
                x = [inp["hidden"].detach().requires_grad_(True), inp["weight"].detach().requires_grad_(True)]
            else:  # an in-place backward overwrites its logits: it gets a copy, made outside the timing
                logits = inp["logits"].detach()
                x = (logits.clone() if name.endswith("_inplace") else logits).requires_grad_(True)
            wall, cpu = time.perf_counter(), time.process_time()
            loss = fn(x, inp)
            loss.backward()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            losses[name] = float(loss)
            if r >= args.warmup:
                times[name].append({"wall_ms": wall * 1e3, "cpu_ms": cpu * 1e3})
            print(f"round {r + 1 - args.warmup}: {name} {wall * 1e3:.0f} ms", file=sys.stderr, flush=True)
    first = args.impls[0]
    rows = []
    for name, ts in times.items():
        ratios = [t["wall_ms"] / f["wall_ms"] for t, f in zip(ts, times[first])]
        rows.append({"impl": name, "loss": losses[name], "wall_ms": statistics.median(t["wall_ms"] for t in ts),
                     "cpu_ms": statistics.median(t["cpu_ms"] for t in ts), "ratio": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios), "rounds": ts})
    settings = {k: getattr(args, k) for k in ("op", "preset", "shape", "hidden", "tokens", "rounds", "warmup")}
    return {"environment": harness.environment(), "settings": settings, "results": rows}


def markdown(report):
    env = report["environment"]
    lines = [f"Interleaved runs (`python bench/bench_interleaved.py`, method in its docstring): {env['cpu']}, "
             f"{env['cores']} cores, torch {env['torch']}, kernels: {env['backend']}.", ""]
    for run_report in report["runs"]:
        s, e = run_report["settings"], run_report["environment"]
        shape = f"{s['shape']}" + (f", H = {s['hidden']}" if s["op"] == "fused_linear" else "")
        lines += [f"### {s['op']} ({s['preset']}) {shape}, {s['tokens']} tokens: {e['date']}, load average "
                  f"{e['load_average'][0]} at its start, {s['rounds']} rounds", "",
                  f"| impl | wall ms (median) | CPU ms (median) | time / {run_report['results'][0]['impl']}'s, "
                  "median of the rounds (min-max) |", "|---|---|---|---|"]
        for r in run_report["results"]:
            lines.append(f"| {r['impl']} | {r['wall_ms']:.0f} | {r['cpu_ms']:.0f} | {r['ratio']:.2f}x "
                         f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) |")
        lines.append("")
    return "\n".join(lines)


def default_out():
    return os.path.join(harness.results_dir(), f"interleaved-{harness.machine_slug()}.json")


def main(argv=None):
    args = parse_args(argv)
    out = args.out or default_out()
    report = {"runs": []}
    if os.path.exists(out):
        with open(out) as f:
            report = json.load(f)
    this = run(args)
    report["environment"] = this["environment"]
    report["runs"].append(this)
    stem = harness.save_report(report, out, markdown)
    print(markdown({"environment": this["environment"], "runs": [this]}))
    print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    return 0
