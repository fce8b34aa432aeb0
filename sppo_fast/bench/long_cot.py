"""`sppo-fast bench --long-cot` (also `python bench/bench_long_cot.py`): one whole RL update step on a long
response, for each `--loss_impl` of the trainer, on the CPU.

Implementations: the trainer's `--loss_impl` choices (fused_linear, fused, compile, eager, torch_lce:
PyTorch 2.13's chunked F.linear_cross_entropy with its default options, which gives no entropy), and
torch_lce_tuned: torch_lce with `--lce-chunk` rows per chunk (the trainer's `--chunk_size`) instead of
torch's choice (on CPU at fp32 "aspect_ratio:2": about 2 V / H chunks whatever the length, e.g. 2 rows
each at 1024 tokens and V = 151936, H = 512).

The step is the trainer's: a Llama-style policy (hidden 512, vocab 151936 by default) with activation
checkpointing on every decoder layer, forward over prompt + response, the SPPO policy loss of the chosen
implementation (sppo_fast.trainer.loss_impls), backward, gradient clipping and an AdamW step. One
sequence per step, so the response length is the only size that grows.

How it measures. Every (length, implementation) runs in its own child process (fresh allocator and
compilation caches). The child builds the model and the optimizer with a fixed seed (so every
implementation computes the same loss: the rows record it), runs two short warm-up steps (64 and 96
tokens: they allocate the optimizer state, and put compile in its steady state, a graph compiled for
dynamic lengths, as a trainer sees after its first recompilation), then one measured step in four
phases: (1) the decoder forward, (2) the loss stage, run as its own autograd segment from the detached
hidden states (loss forward + backward to the hidden states and lm_head: the gradient is the same as one
joint backward), (3) the decoder backward from the hidden states' gradient, (4) clipping and the
optimizer step. Memory is the resident set, made to follow live tensors as in `sppo-fast bench` (glibc
maps every allocation of 64 KiB or more on its own and returns freed memory at once); before each phase
the kernel's high-water mark is reset (/proc/self/clear_refs). peak = the largest high-water mark of the
four phases minus the resident set before the step (the weights, gradients of nothing, the optimizer
state): what the step adds. loss_stage = phase 2's high-water mark minus the resident set when phase 2
starts: what the loss adds on top of the model's own activations. Time is the wall time of the measured
step (one step: these are long). Load: the load average before and after each row and the cores other
processes used while it ran are recorded, and a busy row is flagged (sppo_fast/bench/harness.py).

Cases are predicted before they run: from the last measured lengths of the same implementation (peak
scaled as a power of the length fitted to the last two, at least linearly, which over-estimates since
the gradients are a fixed part), else from a
static model of each implementation's logits-sized temporaries. A case predicted above --budget-gib, or
above the memory the machine has available, is skipped with the reason, and so are the longer ones.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from sppo_fast.bench import harness
from sppo_fast.bench.harness import add_load_arguments, load_policy

LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
IMPLS = ("fused_linear", "fused", "compile", "eager", "torch_lce", "torch_lce_tuned")
LCE_CHUNK = 512  # torch_lce_tuned's rows per chunk (--lce-chunk)
PROMPT = 32
WARMUP_LENGTHS = (64, 96)  # two lengths: compile's second call recompiles for dynamic shapes
# Bytes per (token x vocab) that the loss stage keeps alive at its peak, fp32 (a static guess used only
# until the implementation has a measured length): fused = logits + their gradient; compile ~ three
# logits-sized fp32 tensors; eager ~ seven (logits, scaled logits, log-softmax, probabilities, their
# product, and the backward's two); fused_linear keeps chunks, not logits.
# torch_lce keeps chunks too.
LOSS_BYTES_PER_TV = {"fused_linear": 0.0, "fused": 8.0, "compile": 12.0, "eager": 28.0, "torch_lce": 0.0,
                     "torch_lce_tuned": 0.0}
MEM_MARGIN_GIB = 1.5  # left free for everything else on the machine


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="sppo-fast bench --long-cot", description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS), help="response lengths (tokens)")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=1, help="decoder layers (one keeps the 32k-token attention "
                                                          "affordable on two CPU cores)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--budget-gib", type=float, default=16.0, help="skip cases predicted to need more")
    p.add_argument("--max-step-s", type=float, default=1500.0,
                   help="skip cases whose step is predicted to take longer (seconds, from the measured ones)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the child (0: torch's default)")
    p.add_argument("--lce-chunk", type=int, default=LCE_CHUNK, help="rows per chunk of torch_lce_tuned")
    add_load_arguments(p)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per child process")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script in about a minute")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/long-cot-<cpu>-<isa>-<N>core.json)")
    p.add_argument("--merge", action="store_true", help="keep the rows of --out that this run does not redo")
    p.add_argument("--report-only", action="store_true", help="rewrite .md and .png from --out")
    p.add_argument("--from-log", default=None, metavar="LOG",
                   help="write the report from the lines a run printed (its stdout), e.g. of a run stopped "
                        "before the end; the settings are this command's")
    p.add_argument("--note", default="", help="a line for the report (e.g. how its rows were collected)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.vocab, args.hidden, args.layers, args.heads = [128, 256], 4096, 64, 1, 2
        args.lce_chunk, args.settle = 64, min(args.settle, 5.0)
    return args


# ----------------------------------------------------------------------------------------------------
# The child: one (length, implementation)


def build(case):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sppo_fast.trainer.models import PolicyHidden, enable_checkpointing

    torch.manual_seed(0)
    hidden = case["hidden"]
    config = LlamaConfig(vocab_size=case["vocab"], hidden_size=hidden, num_hidden_layers=case["layers"],
                         num_attention_heads=case["heads"], num_key_value_heads=case["heads"],
                         intermediate_size=4 * hidden, max_position_embeddings=PROMPT + case["length"] + 64,
                         tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    lm = LlamaForCausalLM(config)
    enable_checkpointing(lm)
    lm.train()
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-5, eps=1e-5)
    return lm, PolicyHidden(lm), opt


def batch(case, length):
    """One prompt + response of `length` tokens. old_logp is the log-prob a near-uniform policy gives
    (a freshly initialised one is: its logits are small), so ratios sit near 1 as in training."""
    import torch

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (1, PROMPT + length), generator=gen)
    return {"ids": ids, "attn": torch.ones_like(ids), "targets": ids[:, PROMPT:],
            "old_logp": torch.full((1, length), -math.log(case["vocab"])),
            "advantages": torch.tensor([0.5]), "mask": torch.ones(1, length)}


def update_step(case, lm, policy, opt, inp, phase=None):
    """The RL update step, phase by phase; `phase(name, fn)` wraps each (measurement), default: run it."""
    import torch

    import sppo_fast
    from sppo_fast.trainer.loss_impls import policy_loss_from_hidden

    run = phase or (lambda name, fn: fn())
    config = sppo_fast.PolicyLossConfig.preset("sppo")
    weight = lm.get_output_embeddings().weight
    state = {}

    def forward():
        out = policy(inp["ids"], inp["attn"])
        state["hidden"] = out[:, PROMPT - 1: PROMPT - 1 + inp["targets"].shape[1]]

    impl, chunk = case["impl"], None
    if impl == "torch_lce_tuned":  # the trainer's torch_lce with --chunk_size
        impl, chunk = "torch_lce", case["lce_chunk"]

    def loss_stage():
        h = state["hidden"].detach().requires_grad_(True)
        out = policy_loss_from_hidden(impl, h, weight, None, inp["targets"], inp["old_logp"],
                                      inp["advantages"], inp["mask"], config, chunk_size=chunk)
        out.loss.backward()
        state["grad_hidden"], state["loss"] = h.grad, float(out.loss.detach())

    def backward():
        state.pop("hidden").backward(state.pop("grad_hidden"))

    def optimizer():
        state["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0))
        opt.step()
        opt.zero_grad(set_to_none=True)

    for name, fn in (("forward", forward), ("loss", loss_stage), ("backward", backward), ("optimizer", optimizer)):
        run(name, fn)
    return state


def run_child(case):
    import gc

    import torch

    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    lm, policy, opt = build(case)
    t0 = time.perf_counter()
    for warm_len in WARMUP_LENGTHS:
        update_step(case, lm, policy, opt, batch(case, warm_len))
    result = {"warmup_s": round(time.perf_counter() - t0, 2)}
    inp = batch(case, case["length"])
    harness._faithful_rss()
    gc.collect()
    libc_trim = __import__("ctypes").CDLL("libc.so.6").malloc_trim
    libc_trim(0)
    base = harness.status_kib("VmRSS")
    phases = {}

    def phase(name, fn):
        harness.reset_peak()  # the high-water mark restarts from the current resident set
        start = harness.status_kib("VmRSS")
        t = time.perf_counter()
        fn()
        phases[name] = {"s": round(time.perf_counter() - t, 3), "start_mib": round((start - base) / 1024, 1),
                        "hwm_mib": round((harness.status_kib("VmHWM") - base) / 1024, 1)}

    t0 = time.perf_counter()
    state = update_step(case, lm, policy, opt, inp, phase)
    result["step_s"] = round(time.perf_counter() - t0, 3)
    result["phases"] = phases
    result["peak_mib"] = max(p["hwm_mib"] for p in phases.values())
    result["loss_stage_mib"] = round(phases["loss"]["hwm_mib"] - phases["loss"]["start_mib"], 1)
    result["loss_stage_s"] = phases["loss"]["s"]
    result["base_mib"] = round(base / 1024, 1)
    result["loss"], result["grad_norm"] = state["loss"], state["grad_norm"]
    result["parameters"] = sum(p.numel() for p in lm.parameters())
    return result


def child_main(case_json):
    return harness.report_result(run_child, case_json)


# ----------------------------------------------------------------------------------------------------
# The parent: predict, run, report


def static_prediction_gib(case):
    """Peak above the start: gradients and optimizer temporaries (about 3 x the weights), the checkpointed
    layer inputs and one layer's recomputed activations, and the loss stage's logits-sized temporaries."""
    h, v, t, layers = case["hidden"], case["vocab"], PROMPT + case["length"], case["layers"]
    params = 2 * v * h + layers * (4 * h * h + 3 * h * 4 * h)
    activations = 4 * t * h * (layers + 2) + 4 * t * (12 * h + 3 * 4 * h)
    loss = LOSS_BYTES_PER_TV[case["impl"]] * case["length"] * v
    return (3 * 4 * params + activations + loss) / 2**30


def mem_available_gib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


def extrapolate(points, length):
    """Peak at `length` from the measured (length, GiB) points: a power law through the last two (its
    exponent clamped to [1, 2], so memory that grew faster than linearly, e.g. attention scores, is
    predicted to keep doing so), linear from a single one."""
    (l1, p1) = points[-1]
    exponent = 1.0
    if len(points) > 1 and points[-2][1] > 0 and p1 > 0:
        (l0, p0) = points[-2]
        exponent = min(2.0, max(1.0, math.log(p1 / p0) / math.log(l1 / l0)))
    return p1 * (length / l1) ** exponent, exponent


def skip_reason(case, measured, step_times, args):
    """Why the case must not run (None: run it). `measured`: {impl: [(length, peak GiB), ...]} so far."""
    if measured.get(case["impl"]):
        points = measured[case["impl"]]
        predicted, exponent = extrapolate(points, case["length"])
        how = f"{points[-1][1]:.2f} GiB measured at {points[-1][0]} tokens, scaled as length^{exponent:.2f}"
    else:
        predicted = static_prediction_gib(case)
        how = "static estimate"
    case["predicted_gib"] = round(predicted, 2)
    times = step_times.get(case["impl"])
    if times:
        seconds = extrapolate(times, case["length"])[0]
        case["predicted_step_s"] = round(seconds)
        if seconds > args.max_step_s:
            return (f"skipped: step predicted to take {seconds:.0f} s (> --max-step-s {args.max_step_s:g}) "
                    "on this loaded machine")
    if predicted > args.budget_gib:
        return f"skipped: predicted {predicted:.1f} GiB ({how}) > budget {args.budget_gib:g} GiB"
    free = mem_available_gib() - MEM_MARGIN_GIB
    if predicted > free:
        return f"skipped: predicted {predicted:.1f} GiB ({how}) > {free:.1f} GiB available now"
    return None


def run_case(case, args):
    policy = load_policy(args)
    return harness.run_in_child("sppo_fast.bench.long_cot", case, case, args.timeout, load=policy)


def default_out():
    return os.path.join(harness.results_dir(), f"long-cot-{harness.machine_slug()}.json")


def longest_fitting(rows, impl):
    ok = [r["length"] for r in rows if r["impl"] == impl and r.get("status") == "ok"]
    return max(ok) if ok else None


def best_guess_gib(measured_rows, length):
    """The report's estimate of the peak at an unmeasured `length` (the run's skip decisions use the more
    cautious `extrapolate`): phase by phase, the optimizer phase held constant (it holds only
    parameter-sized tensors), each other phase's high-water mark affine in the length through the last
    two measured lengths (gradients of the weights are its constant part), or proportional to the length
    from a single one; the largest phase is the peak."""
    rows = sorted(measured_rows, key=lambda r: r["length"])
    last = rows[-1]
    guesses = [last["phases"]["optimizer"]["hwm_mib"]]
    for name in ("forward", "loss", "backward"):
        y1 = last["phases"][name]["hwm_mib"]
        if len(rows) > 1:
            l0, y0 = rows[-2]["length"], rows[-2]["phases"][name]["hwm_mib"]
            slope = max(0.0, (y1 - y0) / (last["length"] - l0))
            guesses.append(y1 + slope * (length - last["length"]))
        else:
            guesses.append(y1 * length / last["length"])
    return max(guesses) / 1024


def predictions(rows, lengths, impls):
    """{impl: {length: GiB}} for the grid's lengths past an implementation's longest measured one (an
    estimate from `best_guess_gib`, never reported as a measurement)."""
    out = {}
    for impl in impls:
        ok = [r for r in rows if r["impl"] == impl and r.get("status") == "ok"]
        if ok:
            top = max(r["length"] for r in ok)
            out[impl] = {length: round(best_guess_gib(ok, length), 2) for length in lengths if length > top}
    return out


def targets(rows, budget, lengths=LENGTHS, impls=IMPLS):
    """The issue's targets, read off the measured rows; predicted fits are reported apart."""
    out = {"budget_gib": budget}
    predicted = predictions(rows, lengths, impls)
    out["predicted_peak_gib"] = predicted
    out["longest_predicted_to_fit"] = {
        impl: max([length for length, gib in predicted.get(impl, {}).items() if gib <= budget]
                  + [longest_fitting(rows, impl) or 0]) or None for impl in impls}
    longest = {impl: longest_fitting(rows, impl) for impl in IMPLS}
    out["longest_fitting"] = longest
    ours = longest.get("fused_linear")
    for other in ("eager", "compile", "fused"):
        if ours and longest.get(other):
            out[f"longer_than_{other}"] = round(ours / longest[other], 2)
    by = {(r["impl"], r["length"]): r for r in rows if r.get("status") == "ok"}
    for other in ("compile", "torch_lce", "torch_lce_tuned"):  # fused_linear's step time / theirs
        out[f"time_vs_{other}"] = {
            length: round(by[("fused_linear", length)]["step_s"] / by[(other, length)]["step_s"], 3)
            for (impl, length) in by if impl == other and ("fused_linear", length) in by
            and by[("fused_linear", length)].get("run") == by[(other, length)].get("run")}
    out["loss_stage_growth_bytes_per_token"] = growth_per_token(rows, impls)
    return out


def growth_per_token(rows, impls):
    """{impl: {"L0->L1": bytes}}: how much the loss stage's memory grows per added response token between
    consecutive measured lengths. O(T x H) means a few times H x 4 bytes (the hidden states and their
    gradient); O(T x V) means multiples of V x 4 bytes (a row of fp32 logits)."""
    out = {}
    for impl in impls:
        ok = sorted((r["length"], r["loss_stage_mib"]) for r in rows if r["impl"] == impl and r.get("status") == "ok")
        out[impl] = {f"{a[0]}->{b[0]}": round((b[1] - a[1]) * 2**20 / (b[0] - a[0])) for a, b in zip(ok, ok[1:])}
    return out


def notes(settings):
    """The header's notes on torch_lce and on busy rows, where the run has them."""
    out = ""
    if any(i.startswith("torch_lce") for i in settings["impls"]):
        out += (" torch_lce (PyTorch 2.13's chunked F.linear_cross_entropy, default options) and torch_lce_tuned "
                f"(the same with {settings.get('lce_chunk', LCE_CHUNK)} rows per chunk) compute no entropy.")
    if "max_load" in settings:
        out += (f" (busy): the row started above a load average of {settings['max_load']:g}, or other processes "
                "used more than half a core while it ran.")
    return out


def markdown(report):
    env, rows, tg = report["environment"], report["results"], report["targets"]
    s = report["settings"]
    lines = [f"Long-CoT update step: {env['cpu']}, {env['cores']} cores, torch {env['torch']}, "
             f"`python bench/bench_long_cot.py` ({env['date']}"
             + (f"; its rows merged with those of earlier runs on {', '.join(report['run_dates'][:-1])}"
                if len(report.get("run_dates", [])) > 1 else "") + f"). Policy: hidden {s['hidden']}, "
             f"{s['layers']} decoder layer(s), {s['heads']} heads, vocab {s['vocab']} "
             f"({rows[0].get('parameters', 0) / 1e6 if rows and rows[0].get('parameters') else 0:.0f}M "
             "parameters), activation checkpointing, 1 sequence of 32 prompt + N response tokens, SPPO loss, "
             "AdamW. Peak = resident memory the step adds above the weights and optimizer state; loss stage = "
             "what the loss adds above the model's live activations (its share of the peak in brackets). "
             "One measured step per cell, on a machine shared with other jobs (load average in the JSON): "
             "times are noisy. Method: the docstring of `sppo_fast/bench/long_cot.py`." + notes(s), "",
             "| response tokens | " + " | ".join(s["impls"]) + " |", "|---|" + "---|" * len(s["impls"])]
    by = {(r["impl"], r["length"]): r for r in rows}
    for length in sorted({r["length"] for r in rows} | set(s["lengths"])):
        cells = []
        for impl in s["impls"]:
            r = by.get((impl, length))
            guess = tg["predicted_peak_gib"].get(impl, {}).get(length)
            if r is None:
                cells.append("" if guess is None else f"not run (out of time); predicted peak {guess:.1f} GiB")
            elif r.get("status") != "ok":
                cells.append(r["status"].replace("|", "/")[:120] + (f" [run of {r['run']}]" if r.get("run") else ""))
            else:
                share = r["loss_stage_mib"] / r["peak_mib"] if r["peak_mib"] > 0 else 0
                cells.append(f"peak {r['peak_mib'] / 1024:.2f} GiB, loss stage {r['loss_stage_mib'] / 1024:.2f} GiB "
                             f"({share:.0%}); {r['step_s']:.1f} s" + (" (busy)" if r.get("load_flag") else "")
                             + (f" [run of {r['run']}]" if r.get("run") else ""))
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    lines += ["", f"Longest response measured within the {tg['budget_gib']:g} GiB budget: "
              + ", ".join(f"{k} {v if v else 'none'}" for k, v in tg["longest_fitting"].items()
                          if k in s["impls"]) + "."]
    lines.append("Longest predicted to fit (an estimate from the measured rows, phase by phase: see "
                 "`best_guess_gib`): "
                 + ", ".join(f"{k} {v if v else 'none'}" for k, v in tg["longest_predicted_to_fit"].items()
                             if k in s["impls"]) + ".")
    fit = tg["longest_predicted_to_fit"]
    longest = max(s["lengths"], default=0)
    for other in ("eager", "compile", "fused"):
        if fit.get("fused_linear") == fit.get(other) == longest:
            lines.append(f"- fused_linear and {other} both fit the grid's longest response ({longest}) in "
                         f"{tg['budget_gib']:g} GiB: a longer --lengths grid would tell them apart.")
        elif fit.get("fused_linear") and fit.get(other):
            lines.append(f"- Estimated from the rows: fused_linear fits {fit['fused_linear'] / fit[other]:g}x "
                         f"longer responses than {other} in {tg['budget_gib']:g} GiB (of the lengths in the grid; "
                         "an estimate wherever a length was not run).")
    for other in ("compile", "torch_lce", "torch_lce_tuned"):
        if tg.get(f"time_vs_{other}"):
            lines.append(f"- fused_linear step time / {other} step time, at the lengths both ran: "
                         + ", ".join(f"{k}: {v}" for k, v in sorted(tg[f"time_vs_{other}"].items())) + ".")
    growth = {k: v for k, v in tg["loss_stage_growth_bytes_per_token"].items() if v}
    if growth:
        lines.append(f"- Growth of the loss stage's memory per added response token (H x 4 = {4 * s['hidden']} "
                     f"bytes, one fp32 logits row V x 4 = {4 * s['vocab']} bytes): "
                     + "; ".join(f"{impl} " + ", ".join(f"{k}: {v} B" for k, v in g.items())
                                 for impl, g in growth.items()) + ".")
    losses = {}
    for r in rows:
        if r.get("status") == "ok":
            losses.setdefault(r["length"], []).append(r["loss"])
    spread = max((max(v) - min(v) for v in losses.values() if len(v) > 1), default=0.0)
    lines.append(f"- Same loss from every implementation at each length (largest spread {spread:.2e}).")
    if report.get("note"):
        lines.append(f"\nNote: {report['note']}")
    return "\n".join(lines) + "\n"


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, budget = report["results"], report["settings"]["budget_gib"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for impl in report["settings"]["impls"]:
        pts = sorted((r["length"], r["peak_mib"] / 1024) for r in rows if r["impl"] == impl and r.get("status") == "ok")
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
    ax.axhline(budget, color="red", linestyle="--", linewidth=1, label=f"budget {budget:g} GiB")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("response tokens")
    ax.set_ylabel("peak memory of the update step, GiB")
    s = report["settings"]
    ax.set_title(f"RL update step, H={s['hidden']}, V={s['vocab']} ({report['environment']['cpu']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(report, out, with_plot=True):
    s = report["settings"]
    report["targets"] = targets(report["results"], s["budget_gib"], s["lengths"], s["impls"])
    stem = harness.save_report(report, out, markdown)
    if with_plot:
        plot(report, stem + ".png")
    print(f"wrote {out}, {stem}.md" + (f", {stem}.png" if with_plot else ""))


def _machine(env):
    return env["cpu"], env.get("cpu_capability"), env.get("cores"), tuple(env.get("isa_flags") or ())


def merged(previous, report):
    """`report` with the rows of `previous` it did not redo: the table keeps every implementation and length
    either run has, and the header names the date of every run whose rows it holds."""
    fresh = {(r["impl"], r["length"]) for r in report["results"]}
    env = previous["environment"]
    # A kept row from another machine (the VM's CPU changes from run to run) names the run it came from:
    # its cell says so, and its time is compared only with rows of the same run.
    other_machine = _machine(env) != _machine(report["environment"])
    earlier = f"{env['date'][:10]}, {env['cpu']} {env.get('cpu_capability', '')}".strip()
    kept = [dict(r, run=r.get("run", earlier)) if other_machine or "run" in r else r
            for r in previous["results"] if (r["impl"], r["length"]) not in fresh]
    s = dict(report["settings"])
    impls = set(previous["settings"]["impls"]) | set(s["impls"])
    s["impls"] = [i for i in IMPLS if i in impls]
    s["lengths"] = sorted(set(previous["settings"]["lengths"]) | set(s["lengths"]))
    dates = previous.get("run_dates") or [previous["environment"]["date"]]
    return dict(report, settings=s, results=kept + report["results"],
                run_dates=dates + [report["environment"]["date"]] if kept else [report["environment"]["date"]])


def report_from_log(args):
    """The report of a run from its printed lines: the environment first, then one JSON row per case."""
    with open(args.from_log) as f:
        lines = [json.loads(ln) for ln in f if ln.startswith("{")]
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "report_only", "from_log")}
    rows = [r for r in lines[1:] if "impl" in r]
    return {"environment": lines[0], "settings": settings, "results": rows,
            "method": __doc__.split("How it measures.")[1].strip(),
            "note": args.note or f"rebuilt from the printed rows of a run ({len(rows)} cases)"}


def main(argv=None):
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.child is not None:
        return child_main(args.child)
    out = args.out or default_out()
    if args.report_only:
        with open(out) as f:
            write_reports(json.load(f), out, not args.no_plot)
        return 0
    if args.from_log:
        write_reports(report_from_log(args), out, not args.no_plot)
        return 0
    import torch

    settings = {k: v for k, v in vars(args).items() if k not in ("child", "report_only")}
    report = {"environment": harness.environment(), "settings": settings, "results": [],
              "method": __doc__.split("How it measures.")[1].strip()}
    print(json.dumps(report["environment"]), flush=True)
    measured, step_times, stopped = {}, {}, {}
    for length in sorted(args.lengths):
        for impl in args.impls:
            case = {"impl": impl, "length": length, "vocab": args.vocab, "hidden": args.hidden,
                    "layers": args.layers, "heads": args.heads,
                    "threads": args.threads or torch.get_num_threads(), "lce_chunk": args.lce_chunk}
            if impl in stopped:  # memory grows with length: what did not run will not run longer
                reason = f"skipped: {impl} did not run at {stopped[impl]} tokens"
            else:
                reason = skip_reason(case, measured, step_times, args)
            if reason:
                row = dict(case, status=reason)
                stopped.setdefault(impl, length)
            else:
                row = run_case(case, args)
                if row.get("status") == "ok":
                    measured.setdefault(impl, []).append((length, row["peak_mib"] / 1024))
                    step_times.setdefault(impl, []).append((length, row["step_s"]))
                else:
                    stopped[impl] = length
            report["results"].append(row)
            print(json.dumps(row), flush=True)
    if args.merge and os.path.exists(out):
        with open(out) as f:
            report = merged(json.load(f), report)
    if args.quick and args.out is None:
        print(markdown(dict(report, targets=targets(report["results"], args.budget_gib))))
        return 0
    write_reports(report, out, not args.no_plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
