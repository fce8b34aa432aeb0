"""`sppo-fast bench` (also `python bench/bench_ops.py`): the CPU benchmark of the fused ops.

Times forward and forward+backward and measures peak memory of
  token_logprobs      log-probs + entropy from (B, T, V) logits, backward of a fixed random mix of both;
  fused_policy_loss   the policy loss straight from logits, presets dapo, gspo and sspo;
  fused_linear        the policy loss from hidden states x lm_head (dapo, with entropy), never holding
                      the logits, against Liger-Kernel and Cut Cross-Entropy;
for each implementation, side by side in one run:
  sppo_fast           the op on the native CPU backend (csrc/)
  sppo_fast_inplace   the same with inplace_backward=True (the gradient overwrites the logits)
  eager               sppo_fast.reference: the same computation in plain PyTorch (fp32 accumulation)
  compile             torch.compile of that eager function
  liger               Liger-Kernel's LigerFusedLinearGRPOLoss(compiled=True), loss_type="dapo" (linear only)
  cce                 Cut Cross-Entropy's linear_cross_entropy(impl="torch_compile") (linear only; the mean
                      cross-entropy, i.e. the log-probs without entropy or policy loss: less work than ours)

How it measures. Every (case, implementation) runs in its own child process, so that compilation
caches, allocator state and peak RSS of one cannot leak into another. In the child: inputs are built,
the first call (compilation included) is timed as first_call_s, `warmup` more calls run, then the
median wall time of `reps` calls of the forward (under no_grad) and of forward+backward
(torch.autograd.grad of the loss with respect to the logits, or hidden and weight for the linear
case). The in-place variant restores its logits from a pristine copy before each call, outside the
timed region. Peak memory: there is no allocator counter on CPU, so the child measures the resident
set: glibc is first told to serve every allocation of 64 KiB or more with its own mmap and to return
freed memory at once (mallopt M_MMAP_THRESHOLD / M_TRIM_THRESHOLD), so the resident set follows the
live tensors; then the kernel's high-water mark is reset (/proc/self/clear_refs), one call runs, and
peak_mib = VmHWM - VmRSS before the call: memory above the inputs, the results of the call included
(the gradient of fwd_bwd). Cases whose eager run would need more than --max-gib are skipped.
"""

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

OPS = ("token_logprobs", "fused_policy_loss", "fused_linear")
PRESETS = ("dapo", "gspo", "sspo")
IMPLS = {"token_logprobs": ("sppo_fast", "sppo_fast_inplace", "eager", "compile"),
         "fused_policy_loss": ("sppo_fast", "sppo_fast_inplace", "eager", "compile"),
         "fused_linear": ("sppo_fast", "eager", "compile", "liger", "cce")}
TOKENS = (1024, 2048, 4096, 16384)  # 2048: the size of the targets
VOCABS = (32000, 151936)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SEQ_LEN = 512  # tokens per sequence: B = tokens / SEQ_LEN
SEGMENT_LEN = 32  # SSPO: tokens per segment of the synthetic segment ids
HIDDEN = 512  # the linear case's hidden size
EAGER_LOGITS_COPIES = 5  # an eager fwd+bwd holds about this many logits-sized fp32 tensors


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="sppo-fast bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS))
    p.add_argument("--impls", nargs="+", default=None, help="subset of the implementations (default all)")
    p.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    p.add_argument("--vocab", nargs="+", type=int, default=list(VOCABS))
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--linear-tokens", nargs="+", type=int, default=[2048])
    p.add_argument("--linear-vocab", nargs="+", type=int, default=[32000])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-gib", type=float, default=18.0, help="skip cases whose eager run would need more")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per child process")
    p.add_argument("--quick", action="store_true", help="small sizes: checks the script in about a minute")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/cpu-<N>core.json)")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of an existing --out file that this run does not measure again")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the .md and .png of an existing --out file without measuring")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.vocab, args.linear_tokens, args.linear_vocab = [256], [4096], [256], [4096]
        args.reps, args.warmup = 3, 1
    return args


# ----------------------------------------------------------------------------------------------------
# Inputs and the functions under test (run in the child)


def make_inputs(tokens, vocab, dtype, *, hidden=None, seed=0):
    """One RL micro-batch of `tokens` positions: logits (B, T, V) (or hidden (B, T, H) and weight (V, H)),
    targets, old_logp near the current policy (ratios near 1, as in training), advantages (B,), a mask
    with padding, SSPO segment ids, and the random coefficients of the token_logprobs loss."""
    seq = min(SEQ_LEN, tokens)
    batch = max(1, tokens // seq)
    gen = torch.Generator().manual_seed(seed)
    inp = {}
    if hidden is None:
        inp["logits"] = torch.empty(batch, seq, vocab, dtype=dtype)
        for b in range(batch):  # a sequence at a time: no fp32 copy of 16k x 152k bf16 logits
            inp["logits"][b] = torch.randn(seq, vocab, generator=gen) * 2.0
    else:
        inp["hidden"] = torch.randn(batch, seq, hidden, generator=gen).to(dtype)
        inp["weight"] = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(dtype)
    inp["targets"] = torch.randint(0, vocab, (batch, seq), generator=gen)
    inp["advantages"] = torch.randn(batch, generator=gen)
    mask = torch.ones(batch, seq)
    mask[:, seq - seq // 8:] = 0  # some padding, as in any RL batch
    inp["mask"] = mask
    positions = torch.arange(seq).expand(batch, seq)
    inp["segment_ids"] = torch.where(mask > 0, positions // SEGMENT_LEN, -1)
    inp["g_logp"] = torch.randn(batch, seq, generator=gen)
    inp["g_ent"] = torch.randn(batch, seq, generator=gen)
    inp["old_logp"] = _current_logp(inp) + 0.05 * torch.randn(batch, seq, generator=gen)
    return inp


def _current_logp(inp):
    import sppo_fast as sf

    with torch.no_grad():
        if "logits" in inp:
            return sf.token_logprobs(inp["logits"], inp["targets"])
        return sf.linear_logprobs(inp["hidden"], inp["weight"], inp["targets"])


def _config(preset):
    import sppo_fast as sf

    return sf.PolicyLossConfig.preset(preset)


def _loss_kwargs(inp, preset):
    return {"segment_ids": inp["segment_ids"]} if preset == "sspo" else {}


def build_fn(op, impl, preset):
    """fn(x, inp) -> scalar loss, where x is the logits (or (hidden, weight) for fused_linear)."""
    import sppo_fast as sf
    from sppo_fast import reference

    if op == "token_logprobs":
        def logprobs_loss(module, x, inp, **kw):
            logp, ent = module.token_logprobs(x, inp["targets"], return_entropy=True, **kw)
            return (logp * inp["g_logp"]).sum() + (ent * inp["g_ent"]).sum()

        if impl == "compile":
            compiled = torch.compile(lambda x, t, a, b: logprobs_loss(
                reference, x, {"targets": t, "g_logp": a, "g_ent": b}))
            return lambda x, inp: compiled(x, inp["targets"], inp["g_logp"], inp["g_ent"])
        return {"eager": lambda x, inp: logprobs_loss(reference, x, inp),
                "sppo_fast": lambda x, inp: logprobs_loss(sf, x, inp),
                "sppo_fast_inplace": lambda x, inp: logprobs_loss(sf, x, inp, inplace_backward=True)}[impl]

    config = _config(preset)
    loss_args = ("targets", "old_logp", "advantages", "mask")
    if op == "fused_policy_loss":
        def policy(module, x, inp, **kw):
            return module.fused_policy_loss(x, *(inp[k] for k in loss_args), config,
                                            **_loss_kwargs(inp, preset), **kw).loss

        if impl == "compile":
            compiled = torch.compile(lambda x, t, o, a, m, s: reference.fused_policy_loss(
                x, t, o, a, m, config, segment_ids=s).loss)
            return lambda x, inp: compiled(x, *(inp[k] for k in loss_args),
                                           inp["segment_ids"] if preset == "sspo" else None)
        return {"eager": lambda x, inp: policy(reference, x, inp),
                "sppo_fast": lambda x, inp: policy(sf, x, inp),
                "sppo_fast_inplace": lambda x, inp: policy(sf, x, inp, inplace_backward=True)}[impl]

    # fused_linear: x = (hidden, weight)
    if impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(beta=0.0, compiled=True, use_ref_model=False, loss_type="dapo",
                                         epsilon_low=config.clip_low, epsilon_high=config.clip_high)
        return lambda x, inp: liger(x[0], x[1], inp["targets"], inp["mask"], inp["advantages"],
                                    old_per_token_logps=inp["old_logp"])[0]
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def cce(x, inp):
            targets = torch.where(inp["mask"] > 0, inp["targets"], -100)
            return linear_cross_entropy(x[0], x[1], targets, impl="torch_compile")
        return cce

    def linear(module, x, inp):
        return module.fused_linear_policy_loss(x[0], x[1], *(inp[k] for k in loss_args), config).loss

    if impl == "compile":
        compiled = torch.compile(lambda h, w, t, o, a, m: reference.fused_linear_policy_loss(
            h, w, t, o, a, m, config).loss)
        return lambda x, inp: compiled(x[0], x[1], *(inp[k] for k in loss_args))
    return {"eager": lambda x, inp: linear(reference, x, inp),
            "sppo_fast": lambda x, inp: linear(sf, x, inp)}[impl]


# ----------------------------------------------------------------------------------------------------
# Measurement (in the child)


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _faithful_rss():
    """Make the resident set follow live tensors (see the module docstring)."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.mallopt(m_trim_threshold, 0)
    libc.malloc_trim(0)


def peak_extra_mib(fn):
    """Resident memory above what was resident before fn, at fn's peak (results of fn included)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    base = _status_kib("VmRSS")
    out = fn()
    peak = _status_kib("VmHWM")
    del out
    return (peak - base) / 1024


def median_ms(fn, reps, before=None):
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
        del out
    return statistics.median(times)


def run_child(case):
    """Measures one (case, implementation); returns the result fields."""
    op, impl, preset = case["op"], case["impl"], case.get("preset")
    dtype = DTYPES[case["dtype"]]
    hidden = HIDDEN if op == "fused_linear" else None
    inp = make_inputs(case["tokens"], case["vocab"], dtype, hidden=hidden)
    fn = build_fn(op, impl, preset)
    if op == "fused_linear":
        x = (inp["hidden"].requires_grad_(True), inp["weight"].requires_grad_(True))
        wrt = list(x)
    else:
        x = inp["logits"].requires_grad_(True)
        wrt = [x]
    restore = None
    if impl == "sppo_fast_inplace":  # the backward overwrites the logits: give each call fresh ones
        pristine = x.detach().clone()

        def restore():
            with torch.no_grad():
                x.copy_(pristine)

    def forward():
        with torch.no_grad():
            return fn(x, inp)

    def forward_backward():
        loss = fn(x, inp)
        return torch.autograd.grad(loss, wrt)

    result = {}
    t0 = time.perf_counter()
    forward_backward()
    forward()
    result["first_call_s"] = round(time.perf_counter() - t0, 3)
    for _ in range(case["warmup"]):
        if restore:
            restore()
        forward_backward()
    result["fwd_ms"] = median_ms(forward, case["reps"], restore)
    result["fwd_bwd_ms"] = median_ms(forward_backward, case["reps"], restore)
    _faithful_rss()
    if restore:
        restore()
    result["fwd_peak_mib"] = peak_extra_mib(forward)
    if restore:
        restore()
    result["fwd_bwd_peak_mib"] = peak_extra_mib(forward_backward)
    return result


def child_main(case_json):
    case = json.loads(case_json)
    try:
        out = dict(run_child(case), status="ok")
    except Exception as exc:  # reported in the table, never fatal to the whole run
        out = {"status": f"error: {type(exc).__name__}: {str(exc)[:300]}"}
    print("RESULT " + json.dumps(out), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------------
# The run (in the parent)


def logits_mib(tokens, vocab, dtype):
    return tokens * vocab * torch.tensor([], dtype=DTYPES[dtype]).element_size() / 2**20


def cases(args):
    impls = lambda op: [i for i in IMPLS[op] if args.impls is None or i in args.impls]  # noqa: E731
    for op in args.ops:
        if op == "fused_linear":
            for tokens in args.linear_tokens:
                for vocab in args.linear_vocab:
                    for impl in impls(op):
                        yield {"op": op, "impl": impl, "preset": "dapo", "tokens": tokens, "vocab": vocab,
                               "dtype": "fp32", "hidden": HIDDEN}
            continue
        for dtype in args.dtypes:
            for vocab in args.vocab:
                for tokens in args.tokens:
                    for preset in (args.presets if op == "fused_policy_loss" else [None]):
                        for impl in impls(op):
                            yield {"op": op, "impl": impl, "preset": preset, "tokens": tokens, "vocab": vocab,
                                   "dtype": dtype}


def too_big(case, args):
    """A reason to skip the case, or None."""
    if case["op"] == "fused_linear":
        return None
    logits_gib = logits_mib(case["tokens"], case["vocab"], case["dtype"]) / 1024
    if case["impl"] in ("eager", "compile"):  # fp32 temporaries the size of the logits
        need = logits_gib + case["tokens"] * case["vocab"] * 4 / 2**30 * EAGER_LOGITS_COPIES
    else:  # the logits and their gradient (in place: the logits and a pristine copy to restore)
        need = 2 * logits_gib
    if need > args.max_gib:
        return f"skipped: would need about {need:.0f} GiB (> --max-gib {args.max_gib:g})"
    return None


def run_case(case, args):
    row = dict(case, logits_mib=round(logits_mib(case["tokens"], case["vocab"], case["dtype"]), 1))
    skip = too_big(case, args)
    if skip:
        return dict(row, status=skip)
    payload = json.dumps(dict(case, reps=args.reps, warmup=args.warmup))
    row["load_before"] = round(os.getloadavg()[0], 2)  # other work on the machine skews timings
    code = "import sys; from sppo_fast.bench_cli import child_main; sys.exit(child_main(sys.argv[1]))"
    try:
        proc = subprocess.run([sys.executable, "-c", code, payload], capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(row, status=f"timeout after {args.timeout:g} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return dict(row, status=f"child failed (exit {proc.returncode}): {' | '.join(tail)[:300]}")
    return dict(row, **json.loads(lines[-1][len("RESULT "):]), load_after=round(os.getloadavg()[0], 2))


def agreement():
    """Before timing anything: the fused loss and its gradient on the native backend against eager on a
    small case, so that a broken kernel cannot produce good-looking numbers."""
    import sppo_fast as sf
    from sppo_fast import reference

    inp = make_inputs(512, 1000, torch.float32, seed=1)
    config = _config("dapo")
    got = {}
    for name, module in (("sppo_fast", sf), ("eager", reference)):
        x = inp["logits"].detach().clone().requires_grad_(True)
        out = module.fused_policy_loss(x, inp["targets"], inp["old_logp"], inp["advantages"], inp["mask"],
                                       config)
        (grad,) = torch.autograd.grad(out.loss, x)
        got[name] = (out.loss.detach().double(), grad.double())
    report = {"loss_abs_diff": (got["sppo_fast"][0] - got["eager"][0]).abs().item(),
              "grad_max_abs_diff": (got["sppo_fast"][1] - got["eager"][1]).abs().max().item(),
              "grad_max_abs": got["eager"][1].abs().max().item()}
    report["ok"] = (report["loss_abs_diff"] < 1e-4
                    and report["grad_max_abs_diff"] <= 1e-4 * report["grad_max_abs"])
    return report


def environment():
    import sppo_fast as sf

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
           "python": platform.python_version(), "backend": sf.backend_info()["cpu"],
           "thp": _read("/sys/kernel/mm/transparent_hugepage/enabled")}
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("liger-kernel", "cut-cross-entropy"):
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            env[pkg] = "not installed"
    return env


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def _cpu_model():
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def default_out():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(root, "bench", "results", f"cpu-{os.cpu_count()}core.json")


# ----------------------------------------------------------------------------------------------------
# Reporting


def _key(row):
    return (row["op"], row.get("preset"), row["dtype"], row["vocab"], row["tokens"])


def speedups(rows):
    """Per case, sppo_fast's ratios against the other implementations (time: theirs / ours)."""
    by_case = {}
    for r in rows:
        by_case.setdefault(_key(r), {})[r["impl"]] = r
    out = []
    for key, impls in by_case.items():
        for ours_name in ("sppo_fast", "sppo_fast_inplace"):
            ours = impls.get(ours_name)
            if not ours or ours.get("status") != "ok":
                continue
            entry = {"op": key[0], "preset": key[1], "dtype": key[2], "vocab": key[3], "tokens": key[4],
                     "impl": ours_name, "fwd_bwd_ms": ours["fwd_bwd_ms"],
                     "peak_over_logits": round(ours["fwd_bwd_peak_mib"] / ours["logits_mib"], 3)
                     if key[0] != "fused_linear" else None}
            for other, r in impls.items():
                if other.startswith("sppo_fast") or r.get("status") != "ok":
                    continue
                entry[f"fwd_bwd_x_vs_{other}"] = round(r["fwd_bwd_ms"] / ours["fwd_bwd_ms"], 2)
                entry[f"fwd_x_vs_{other}"] = round(r["fwd_ms"] / ours["fwd_ms"], 2)
            out.append(entry)
    return out


def markdown_table(rows):
    head = ("| op | preset | dtype | V | tokens | impl | fwd ms | fwd+bwd ms | fwd+bwd peak MiB "
            "(x logits) | first call s |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        case = f"| {r['op']} | {r.get('preset') or ''} | {r['dtype']} | {r['vocab']} | {r['tokens']} | {r['impl']} |"
        if r.get("status") != "ok":
            lines.append(f"{case} {r['status']} | | | |")
            continue
        ratio = "" if r["op"] == "fused_linear" else f" ({r['fwd_bwd_peak_mib'] / r['logits_mib']:.2f}x)"
        lines.append(f"{case} {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | "
                     f"{r['fwd_bwd_peak_mib']:.0f}{ratio} | {r['first_call_s']:.1f} |")
    return "\n".join(lines)


def summary_table(rows):
    """One line per case: fwd+bwd time of each implementation, with the others' time as a multiple of
    sppo_fast's, and peak memory above the inputs as a multiple of the logits' size."""
    by_case = {}
    for r in rows:
        by_case.setdefault(_key(r), {})[r["impl"]] = r
    order = ("sppo_fast", "sppo_fast_inplace", "compile", "eager", "liger", "cce")
    lines = ["| op | dtype | V | tokens | " + " | ".join(order) + " |", "|---|---|---|---|" + "---|" * len(order)]
    for key, impls in sorted(by_case.items(), key=lambda kv: (kv[0][0], str(kv[0][1]), kv[0][2], kv[0][3],
                                                               kv[0][4])):
        ours = impls.get("sppo_fast")
        base = ours["fwd_bwd_ms"] if ours and ours.get("status") == "ok" else None
        cells = []
        for name in order:
            r = impls.get(name)
            if r is None:
                cells.append("")
            elif r.get("status") != "ok":
                cells.append("skipped" if r["status"].startswith("skipped") else r["status"][:30])
            else:
                ratio = f" ({r['fwd_bwd_ms'] / base:.1f}x)" if base and not name.startswith("sppo_fast") else ""
                compiled = impls.get("compile", {})
                if name == "sppo_fast_inplace" and compiled.get("status") == "ok":
                    ratio = f" (compile: {compiled['fwd_bwd_ms'] / r['fwd_bwd_ms']:.1f}x this)"
                mem = (f"{r['fwd_bwd_peak_mib']:.0f} MiB" if key[0] == "fused_linear"
                       else f"{r['fwd_bwd_peak_mib'] / r['logits_mib']:.2f}x")
                cells.append(f"{r['fwd_bwd_ms']:.0f} ms{ratio}, {mem}")
        op = key[0] + (f" {key[1]}" if key[1] and key[0] != "fused_linear" else "")
        lines.append(f"| {op} | {key[2]} | {key[3]} | {key[4]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_reports(report, out, plot_png=True):
    stem = os.path.splitext(out)[0]
    env = report["environment"]
    with open(stem + ".md", "w") as f:
        f.write(f"CPU benchmark: {env['cpu']}, {env['cores']} cores, torch {env['torch']}, "
                f"`python bench/bench_ops.py` (method: bench/README.md).\n\n"
                "Forward+backward median time (in brackets: as a multiple of `sppo_fast`'s; for the in-place "
                "variant, compile's time as a multiple of its own) and peak memory "
                "above the inputs (as a multiple of the logits' size; in MiB for the linear case, whose "
                "logits are never materialised by the fused implementations).\n\n")
        f.write(summary_table(report["results"]) + "\n\nEvery measurement (forward alone included):\n\n")
        f.write(markdown_table(report["results"]) + "\n")
    if plot_png and plot(report["results"], stem + ".png"):
        print(f"wrote {stem}.png")
    print(f"wrote {stem}.md")


def plot(rows, path):
    """Time and peak memory of fwd+bwd against tokens, one line per implementation, one column per
    (op, preset, dtype, V) with more than one token count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {}
    for r in rows:
        if r.get("status") == "ok":
            groups.setdefault(_key(r)[:4], []).append(r)
    groups = {k: v for k, v in groups.items() if len({r["tokens"] for r in v}) > 1}
    if not groups:
        return False
    fig, axes = plt.subplots(2, len(groups), figsize=(3.6 * len(groups), 6.5), squeeze=False)
    for col, (key, group) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        impls = sorted({r["impl"] for r in group})
        for impl in impls:
            pts = sorted((r["tokens"], r["fwd_bwd_ms"], r["fwd_bwd_peak_mib"])
                         for r in group if r["impl"] == impl)
            xs = [p[0] for p in pts]
            axes[0][col].plot(xs, [p[1] for p in pts], marker="o", label=impl)
            axes[1][col].plot(xs, [p[2] for p in pts], marker="o", label=impl)
        op, preset, dtype, vocab = key
        axes[0][col].set_title(f"{op}{'/' + preset if preset else ''}\n{dtype} V={vocab}", fontsize=8)
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens", fontsize=8)
            ax.tick_params(labelsize=7)
        axes[0][col].set_ylabel("fwd+bwd ms", fontsize=8)
        axes[1][col].set_ylabel("fwd+bwd peak MiB above inputs", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--long-cot" in argv:  # the whole-update-step benchmark has its own options
        from sppo_fast.bench_long_cot import main as long_cot_main

        return long_cot_main([a for a in argv if a != "--long-cot"])
    args = parse_args(argv)
    if args.child is not None:
        return child_main(args.child)
    if args.report_only:
        with open(args.out or default_out()) as f:
            report = json.load(f)
        report["speedups"] = speedups(report["results"])
        write_reports(report, args.out or default_out(), not args.no_plot)
        return 0
    import sppo_fast as sf

    if not sf.backend_info()["cpu"].startswith("native"):
        print(f"warning: the native kernels do not serve CPU here ({sf.backend_info()['cpu']}); "
              "the 'sppo_fast' rows time whatever does", file=sys.stderr)
    report = {"environment": environment(), "settings": {k: v for k, v in vars(args).items() if k != "child"},
              "method": __doc__.split("How it measures.")[1].strip(), "agreement": agreement(), "results": []}
    print(json.dumps(report["environment"], indent=1), "\nagreement:", report["agreement"], flush=True)
    if not report["agreement"]["ok"]:
        print("the fused loss disagrees with eager: not timing a wrong kernel", file=sys.stderr)
        return 1
    for case in cases(args):
        row = run_case(case, args)
        report["results"].append(row)
        print(json.dumps(row), flush=True)
    out = args.out or (None if args.quick else default_out())
    if args.merge and out and os.path.exists(out):
        with open(out) as f:
            previous = json.load(f)
        fresh = {_key(r) + (r["impl"],) for r in report["results"]}
        kept = [r for r in previous["results"] if _key(r) + (r["impl"],) not in fresh]
        report["results"] = kept + report["results"]
        report["runs"] = previous.get("runs", [previous["settings"]]) + [report["settings"]]
    report["speedups"] = speedups(report["results"])
    print("\n" + markdown_table(report["results"]))
    print("\nsppo_fast against the others (fwd+bwd time ratios, theirs / ours):")
    for s in report["speedups"]:
        print(json.dumps(s))
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
        write_reports(report, out, not args.no_plot)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
