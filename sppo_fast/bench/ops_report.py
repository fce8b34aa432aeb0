"""The ops benchmark's report: speed-ups, the tables of bench/results/<machine>.md (targets of issues 12
and 18, one line per implementation with its floor, every measurement) and the plot. Works on the
rows of a results JSON alone, so that `--report-only` rewrites them without measuring."""

import os

ORACLE = "oracle"  # sppo_fast.reference: only with --impls oracle, never in the default tables
IMPL_ORDER = ("sppo_fast", "sppo_fast_inplace", "sppo_fast_two_pass", "sppo_fast_chunk128", "torch_compile",
              "torch_eager", "verl_compile", "verl_eager", "trl_compile", "trl_eager", "trl_chunked", "liger", "cce",
              "torch_lce", "torch_lce_tuned", ORACLE)
NO_ENTROPY = ("cce", "torch_lce", "torch_lce_tuned")  # they compute less than ours: no entropy
# Issue 18's targets: % of the three-stream floor (logits path) or of three torch.mm (linear path)
FLOOR_TARGETS = {("fp32", 32000): 90.0, ("bf16", 151936): 60.0}
LINEAR_FLOOR_TARGET = 85.0
LCE_SPEEDUP_TARGET = 2.0


def key_of(row):
    return (row["op"], row.get("preset"), row["dtype"], row["vocab"], row["tokens"])


def _ok(r):
    return bool(r) and r.get("status") == "ok"


def speedups(rows):
    """Per case, sppo_fast's ratios against the other implementations (time: theirs / ours)."""
    by_case = {}
    for r in rows:
        by_case.setdefault(key_of(r), {})[r["impl"]] = r
    out = []
    for key, impls in by_case.items():
        for ours_name in ("sppo_fast", "sppo_fast_inplace"):
            ours = impls.get(ours_name)
            if not _ok(ours):
                continue
            entry = {"op": key[0], "preset": key[1], "dtype": key[2], "vocab": key[3], "tokens": key[4],
                     "impl": ours_name, "fwd_bwd_ms": ours["fwd_bwd_ms"],
                     "fwd_bwd_pct_of_floor": ours.get("fwd_bwd_pct_of_floor"),
                     "peak_over_logits": round(ours["fwd_bwd_peak_mib"] / ours["logits_mib"], 3)
                     if key[0] != "fused_linear" else None}
            for other, r in impls.items():
                if other.startswith("sppo_fast") or not _ok(r):
                    continue
                entry[f"fwd_bwd_x_vs_{other}"] = round(r["fwd_bwd_ms"] / ours["fwd_bwd_ms"], 2)
                entry[f"fwd_x_vs_{other}"] = round(r["fwd_ms"] / ours["fwd_ms"], 2)
            out.append(entry)
    return out


def _ms(x):
    """A time in ms, to about three figures."""
    if x is None or x != x:
        return ""
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.2f}"


def _pct(x):
    return "" if x is None else f"{x:.0f}%"


def _flag(r):
    return " (busy)" if r.get("load_flag") else ""


def markdown_table(rows):
    """Every row as measured."""
    head = ("| op | preset | dtype | V | tokens | impl | fwd ms | % of floor | fwd+bwd ms | % of floor "
            "(of stream floor) | fwd+bwd peak MiB (x logits) | pool holds MiB | first call s | "
            "load before, after; others' cores | flag |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        case = f"| {r['op']} | {r.get('preset') or ''} | {r['dtype']} | {r['vocab']} | {r['tokens']} | {r['impl']} |"
        load = f"{r.get('load_before')}, {r.get('load_after')}; {r.get('others_cores', '')}"
        if not _ok(r):
            lines.append(f"{case} {r['status']} | | | | | | | {load} | |")
            continue
        ratio = "" if r["op"] == "fused_linear" else f" ({r['fwd_bwd_peak_mib'] / r['logits_mib']:.2f}x)"
        stream = r.get("fwd_bwd_pct_of_stream_floor")
        fb = _pct(r.get("fwd_bwd_pct_of_floor")) + (f" ({stream:.0f}%)" if stream is not None else "")
        lines.append(f"{case} {r['fwd_ms']:.1f} | {_pct(r.get('fwd_pct_of_floor'))} | {r['fwd_bwd_ms']:.1f} | {fb} | "
                     f"{r['fwd_bwd_peak_mib']:.0f}{ratio} | {r.get('pool_held_mib', float('nan')):.0f} | "
                     f"{r['first_call_s']:.1f} | {load} | {_notes(r)} |")
    return "\n".join(lines)


def _notes(r):
    notes = [r["load_flag"]] if r.get("load_flag") else []
    if r.get("reps_cut_by_budget_s"):
        notes.append(f"{r['reps']} repetition(s): slow calls (--max-case-s {r['reps_cut_by_budget_s']:g})")
    return "; ".join(notes)


def _by_case(rows):
    by_case = {}
    for r in rows:
        by_case.setdefault(key_of(r), {})[r["impl"]] = r
    return sorted(by_case.items(), key=lambda kv: tuple(str(k) for k in kv[0]))


def _ordered(impls):
    return sorted(impls, key=lambda n: IMPL_ORDER.index(n) if n in IMPL_ORDER else len(IMPL_ORDER))


def _memory(r, linear):
    if linear:
        return f"{r['fwd_bwd_peak_mib']:.0f} MiB", f"{r.get('pool_held_mib', float('nan')):.0f} MiB"
    return (f"{r['fwd_bwd_peak_mib'] / r['logits_mib']:.2f}x",
            f"{r.get('pool_held_mib', float('nan')) / r['logits_mib']:.2f}x")


def _label(name, r):
    if name == ORACLE:
        return f"{name} (the fp64-grade oracle, not a baseline)"
    label = name + (" (no entropy)" if name in NO_ENTROPY else "")
    opts = r.get("lce_options")
    if opts:
        label += f" [{opts['batch_chunk_size']} rows/chunk, {opts['acc_policy']}]"
    return label


def summary_table(rows):
    """One line per (case, implementation): fwd+bwd median, as a multiple of sppo_fast's, its floor and
    the % of it, the forward alone, and memory above the inputs (peak during the call, and what
    sppo_fast's gradient pool holds after it) as a multiple of the logits' size (MiB for the linear
    case, whose logits the fused implementations never hold)."""
    lines = ["| op | dtype | V | tokens | impl | fwd+bwd ms | x sppo_fast | floor ms | % of floor | fwd+bwd CPU ms | "
             "fwd ms | peak | pool holds after |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, impls in _by_case(rows):
        ours = impls.get("sppo_fast")
        base = ours["fwd_bwd_ms"] if _ok(ours) else None
        op = key[0] + (f" {key[1]}" if key[1] and key[0] != "fused_linear" else "")
        for name in _ordered(impls):
            r = impls[name]
            case = f"| {op} | {key[2]} | {key[3]} | {key[4]} | {_label(name, r)} |"
            if not _ok(r):
                lines.append(f"{case} {r['status'][:80]} | | | | | | | |")
                continue
            ratio = f"{r['fwd_bwd_ms'] / base:.2f}x" if base else ""
            peak, held = _memory(r, key[0] == "fused_linear")
            cpu = f"{r['fwd_bwd_cpu_ms']:.0f}" if "fwd_bwd_cpu_ms" in r else ""
            floor = r.get("floors", {}).get("fwd_bwd", {}).get("floor_ms")
            lines.append(f"{case} {_ms(r['fwd_bwd_ms'])}{_flag(r)} | {ratio} | {_ms(floor)} | "
                         f"{_pct(r.get('fwd_bwd_pct_of_floor'))} | {cpu} | {_ms(r['fwd_ms'])} | {peak} | {held} |")
    return "\n".join(lines)


def _mark(ok):
    return "met" if ok else "NOT met"


def targets_table(rows):
    """Issue 12's targets, per case of fused_policy_loss: sppo_fast >= 3x torch.compile of the idiomatic
    loss (in place >= 5x), peak 1.00x the logits (0 in place), backward (fwd+bwd - fwd) <= 1.5x the
    forward."""
    lines = ["| case | sppo_fast vs torch_compile | in place vs torch_compile | the same in CPU time | "
             "peak (in place) | backward / forward (in place) |", "|---|---|---|---|---|---|"]
    for key, impls in _by_case(rows):
        if key[0] != "fused_policy_loss":
            continue
        ours, inplace, comp = (impls.get(n, {}) for n in ("sppo_fast", "sppo_fast_inplace", "torch_compile"))
        if not all(_ok(r) for r in (ours, inplace, comp)):
            continue

        def bwd_over_fwd(r):
            return (r["fwd_bwd_ms"] - r["fwd_ms"]) / r["fwd_ms"]

        x, xi = comp["fwd_bwd_ms"] / ours["fwd_bwd_ms"], comp["fwd_bwd_ms"] / inplace["fwd_bwd_ms"]
        cpu = "" if "fwd_bwd_cpu_ms" not in comp else ", ".join(
            f"{comp['fwd_bwd_cpu_ms'] / r['fwd_bwd_cpu_ms']:.2f}x" for r in (ours, inplace))
        peak, peak_in = (r["fwd_bwd_peak_mib"] / r["logits_mib"] for r in (ours, inplace))
        lines.append(f"| {key[1]} {key[2]} V={key[3]} {key[4]} tokens | {x:.2f}x ({_mark(x >= 3)}) | "
                     f"{xi:.2f}x ({_mark(xi >= 5)}) | {cpu} | {peak:.2f}x ({peak_in:.2f}x) | "
                     f"{bwd_over_fwd(ours):.2f} ({bwd_over_fwd(inplace):.2f}) |")
    return "\n".join(lines)


def _stream_mark(pct, goal, inplace):
    """met / NOT met against the stream floor, unless a sppo_fast row ran faster than that floor: the
    copy that measures the bandwidth pays a read of every line it writes (the write-allocate), which our
    in-place and non-temporal writes do not, so on such a run the copy's bandwidth is no bound and the
    target is not judged."""
    fastest = max(pct, inplace.get("fwd_bwd_pct_of_stream_floor") or 0) if _ok(inplace) else pct
    if fastest > 100:
        return f"not judged: a sppo_fast row ran at {fastest:.0f}% of this run's stream floor"
    return _mark(pct >= goal)


def _lce_cell(ours, lce):
    """(cell, met): ours against one torch_lce row: its time / ours, both peaks, and whether ours is
    >= LCE_SPEEDUP_TARGET faster at no more memory."""
    if not (_ok(ours) and _ok(lce)):
        return "", False
    x = lce["fwd_bwd_ms"] / ours["fwd_bwd_ms"]
    met = x >= LCE_SPEEDUP_TARGET and ours["fwd_bwd_peak_mib"] <= lce["fwd_bwd_peak_mib"]
    return f"{x:.2f}x faster, {ours['fwd_bwd_peak_mib']:.0f} vs {lce['fwd_bwd_peak_mib']:.0f} MiB", met


def _linear_target_row(case, judged, ours, impls, floors):
    """The linear path's row of floor_targets_table. Against each torch_lce row the target is met by
    sppo_fast's default chunks or by its 128-row ones (a chunk_size a user may pass for less memory)."""
    pct = ours.get("fwd_bwd_pct_of_floor")
    small = impls.get("sppo_fast_chunk128", {})
    cells, small_cells, met = [], [], [pct is not None and pct >= LINEAR_FLOOR_TARGET]
    for lce in ("torch_lce", "torch_lce_tuned"):
        cell, ok = _lce_cell(ours, impls.get(lce, {}))
        small_cell, small_ok = _lce_cell(small, impls.get(lce, {}))
        cells.append(cell)
        small_cells.append(small_cell)
        met.append(ok or small_ok)
    small_vs_tuned = f"{_ms(small['fwd_bwd_ms'])}: {small_cells[1]}" if small_cells[1] else ""
    target = (f">= {LINEAR_FLOOR_TARGET:.0f}% and >= {LCE_SPEEDUP_TARGET:g}x at no more memory: {_mark(all(met))}"
              if judged else "")
    return (f"| {case}{_flag(ours)} | {_ms(ours['fwd_bwd_ms'])}, {_pct(pct)} | {_ms(floors.get('floor_ms'))} | "
            f"{cells[0]} | {cells[1]} | {small_vs_tuned} | {target} |")


def floor_targets_table(rows):
    """Issue 18's floor targets at 2048 tokens, per case: the logits path's fwd+bwd at >= 90% (fp32
    V=32000) / >= 60% (bf16 V=151936) of the three-stream floor, the linear path at >= 85% of three
    torch.mm and >= 2x faster than torch_lce (default and tuned options) at no more memory."""
    lines = ["| case | sppo_fast: fwd+bwd ms, % of stream floor (% of floor) | in place | exp floor ms | "
             "stream floor ms | target | two passes ms: one pass's speed-up (>= 1.3x) |",
             "|---|---|---|---|---|---|---|"]
    linear = ["| case | sppo_fast: fwd+bwd ms, % of three torch.mm | three torch.mm ms | vs torch_lce (default) "
              "time, memory | vs torch_lce_tuned time, memory | sppo_fast_chunk128 vs torch_lce_tuned time, memory "
              "| target |", "|---|---|---|---|---|---|---|"]
    for key, impls in _by_case(rows):
        ours = impls.get("sppo_fast", {})
        if not _ok(ours) or not ours.get("floors"):
            continue
        case = f"{key[0]}{' ' + key[1] if key[1] and key[0] != 'fused_linear' else ''} {key[2]} V={key[3]} " \
               f"{key[4]} tokens"
        fb = ours["floors"].get("fwd_bwd", {})
        if key[0] == "fused_linear":
            linear.append(_linear_target_row(case, key[4] == 2048, ours, impls, fb))
            continue
        inplace = impls.get("sppo_fast_inplace", {})
        stream = ours.get("fwd_bwd_pct_of_stream_floor")
        goal = FLOOR_TARGETS.get((key[2], key[3])) if key[4] == 2048 else None
        target = "" if goal is None or stream is None else f">= {goal:.0f}%: {_stream_mark(stream, goal, inplace)}"
        inp = (f"{_ms(inplace['fwd_bwd_ms'])}, {_pct(inplace.get('fwd_bwd_pct_of_stream_floor'))}"
               if _ok(inplace) else "")
        one_pass = _one_pass_cell(ours, impls.get("sppo_fast_two_pass", {}), key[2])
        lines.append(f"| {case}{_flag(ours)} | {_ms(ours['fwd_bwd_ms'])}, {_pct(stream)} "
                     f"({_pct(ours.get('fwd_bwd_pct_of_floor'))}) | {inp} | {_ms(fb.get('exp_ms'))} | "
                     f"{_ms(fb.get('stream_ms'))} | {target} | {one_pass} |")
    out = []
    if len(lines) > 2:
        out.append("\n".join(lines))
    if len(linear) > 2:
        out.append("\n".join(linear))
    return "\n\n".join(out)


def _one_pass_cell(ours, two_pass, dtype):
    """The two-pass row's time and sppo_fast's speed-up over it (issue 18: >= 1.3x), or "" if not measured.
    sppo_fast takes one pass where the plan chooses it (sppo_fast.plan.logits_one_pass: bf16/fp16 logits);
    where it keeps two (fp32), the two rows run the same code and their ratio is the run's noise, which the
    cell says."""
    if not _ok(two_pass):
        return ""
    x = two_pass["fwd_bwd_ms"] / ours["fwd_bwd_ms"]
    same = "; the plan keeps two passes at fp32: the same code, the ratio is noise" if dtype == "fp32" else ""
    return f"{_ms(two_pass['fwd_bwd_ms'])}: {x:.2f}x ({_mark(x >= 1.3 and not same)}{same})"


def _floor_parts(fl):
    """The floors of one run, in words, one part per floor."""
    m = fl.get("machine") or {}
    parts = []
    if m.get("status") == "ok":
        runs = [r.get("machine", {}).get("stream_gbps") for r in fl.get("runs", [])]
        parts.append(f"streaming bandwidth **{m['stream_gbps']:.1f} GB/s** (a copy of {m['stream_bytes'] / 2**30:.1f} "
                     f"GiB fp32, read + write, {m['threads']} threads; before and after the cases: "
                     f"{', '.join(str(x) for x in runs if x)} GB/s)")
        parts.append("native exp rate (the forward kernel on an L2-resident block, all threads) " + ", ".join(
            f"{d} **{e['exp_per_s'] / 1e9:.2f} G/s**" for d, e in sorted(m.get("exp", {}).items()) if e))
    elif m:
        parts.append(f"machine floors not measured: {m.get('status')}")
    for r in fl.get("matmul", []):
        if r.get("status") == "ok":
            mm = r["mm_ms"]
            widened = (" (on fp32 copies: no dot products of that dtype on this CPU)"
                       if r.get("operands") == "float32" and r["dtype"] != "fp32" else "")
            parts.append(f"three torch.mm at {r['dtype']}{widened} N={r['tokens']} H={r['hidden']} V={r['vocab']}: "
                         f"**{_ms(r['mm3_ms'])} ms** (logits {_ms(mm['logits'])}, hidden gradient "
                         f"{_ms(mm['grad_hidden'])}, weight gradient {_ms(mm['grad_weight'])})")
        else:
            parts.append(f"matmul floor at {r.get('dtype')} V={r.get('vocab')}: {r.get('status')}")
    return parts


def floors_paragraph(report):
    """What the floors of this run are, in words, and those of the earlier runs merged into the file
    (whose rows carry their own run's floors)."""
    fl = report.get("floors")
    if not fl:
        return "No floors in this file (runs before issue 18, or `--no-floors`).\n\n"
    earlier = [p for f in report.get("earlier_floors", []) for p in _floor_parts(f)]
    merged = (" Floors of the earlier runs merged here, which their rows are measured against: "
              + "; ".join(earlier) + ".") if earlier else ""
    return ("Floors measured in this run, before and after the cases (the better of the two; method: "
            "`sppo_fast/bench/floors.py`): " + "; ".join(_floor_parts(fl)) + "." + merged + " Logits path: stream "
            "floor = bytes moved (forward: the logits read once; forward+backward: read twice, the gradient "
            "written once) / bandwidth; exp floor = one exp per logit per pass at the native rate; floor = the "
            "larger. Linear path: floor = the three matmuls (forward: the first). % of floor = floor / time.\n\n")


def write_reports(report, out, plot_png=True):
    stem = os.path.splitext(out)[0]
    env = report["environment"]
    runs = report.get("runs", [report["settings"]])
    rows = report["results"]
    limit = report["settings"].get("max_load")
    busy = sum(1 for r in rows if r.get("load_flag"))
    with open(stem + ".md", "w") as f:
        source = " (lscpu)" if "caches" in env else ""  # runs before issue 18 read /proc/cpuinfo
        f.write(f"CPU benchmark: **{env['cpu']}**{source}, {env['cores']} cores "
                f"({', '.join(env.get('isa_flags', []))}), torch {env['torch']}, kernels: {env['backend']}; "
                f"`python bench/bench_ops.py` (method: bench/README.md), {len(runs)} run(s), the last on "
                f"{env['date']}; load average {env.get('load_average', 'not recorded')} at its start (other jobs "
                "on the machine slow every implementation; each row records the load before and after it, and "
                "the cores other processes used while it ran).")
        if limit is not None:
            f.write(f" Rows that started above a load average of {limit:g}, or during which other processes used "
                    f"more than half a core, are marked (busy): {busy} of {len(rows)}.")
        f.write("\n\n" + floors_paragraph(report))
        f.write("Medians of forward+backward, the forward alone (under no_grad), and memory above the inputs "
                "(peak during one call after warm-up, and what sppo_fast's gradient pool holds after it: the "
                "last gradient's block, kept for the next call), as a multiple of the logits' size (MiB for "
                "the linear case). cce and torch_lce compute no entropy (less work than the others).\n\n")
        floor_targets = floor_targets_table(rows)
        if floor_targets:
            f.write("Issue 18's targets (the machine's floor) on this machine:\n\n" + floor_targets + "\n\n")
        targets = targets_table(rows)
        if targets.count("\n") > 1:
            f.write("Issue 12's targets on this machine:\n\n" + targets + "\n\n")
        f.write(summary_table(rows) + "\n\n")
        sweeps = [r for r in rows if r.get("lce_sweep")]
        for r in sweeps:
            f.write(f"torch_lce_tuned's sweep at {r['dtype']} V={r['vocab']} {r['tokens']} tokens (one fwd+bwd each, "
                    "ms): " + ", ".join(f"{s['batch_chunk_size']} rows {s['acc_policy']} {s['fwd_bwd_ms']:.0f}"
                                        for s in r["lce_sweep"]) + ".\n\n")
        f.write("Every measurement:\n\n" + markdown_table(rows) + "\n")
    if plot_png and plot(rows, stem + ".png", env):
        print(f"wrote {stem}.png")
    print(f"wrote {stem}.md")


def plot(rows, path, env):
    """One panel per case: fwd+bwd median of each implementation (bars, log scale), its peak memory as
    a multiple of the logits written on the bar, the floor as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [(key, {n: r for n, r in impls.items() if _ok(r)}) for key, impls in _by_case(rows)]
    cases = [(key, impls) for key, impls in cases if impls]
    if not cases:
        return False
    fig, axes = plt.subplots(1, len(cases), figsize=(max(5.0, 3.4 * len(cases)), 4.4), squeeze=False)
    for ax, (key, impls) in zip(axes[0], cases):
        names = [n for n in IMPL_ORDER if n in impls]
        times = [impls[n]["fwd_bwd_ms"] for n in names]
        colors = ["tab:green" if n.startswith("sppo_fast") else "tab:gray" for n in names]
        ax.bar(range(len(names)), times, color=colors)
        for i, n in enumerate(names):
            r = impls[n]
            mem = (f"{r['fwd_bwd_peak_mib']:.0f}M" if key[0] == "fused_linear"
                   else f"{r['fwd_bwd_peak_mib'] / r['logits_mib']:.1f}x")
            ax.text(i, times[i], mem, ha="center", va="bottom", fontsize=6)
        floor = next((impls[n].get("floors", {}).get("fwd_bwd", {}).get("floor_ms") for n in names
                      if impls[n].get("floors")), None)
        low = min(times + ([floor] if floor else []))
        if floor:
            ax.axhline(floor, color="black", linestyle="--", linewidth=0.8)
            ax.text(len(names) - 0.5, floor, "floor", ha="right", va="bottom", fontsize=6)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylim(low / 4, max(times) * 2)  # room below the shortest bar, so its height shows
        ax.set_ylabel("fwd+bwd ms (median)", fontsize=8)
        ax.set_title(f"{key[0]}{' ' + key[1] if key[1] else ''}\n{key[2]} V={key[3]} {key[4]} tokens", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"{env['cpu']}, {env['cores']} cores, torch {env['torch']}\n(labels: peak memory; dashed: the "
                 "machine's floor)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
