"""`sppo-fast bench --vocab-parallel` (also `python bench/bench_vocab_parallel.py`): the scale-out benchmark
of the fused policy loss with the lm_head split by vocabulary rows over P ranks (tensor parallel), per
rank, on the CPU with the gloo backend.

Implementations (the DAPO preset; hidden states (N, H) replicated, targets global ids, V divisible by P):
  sppo_unsharded              sppo_fast.fused_linear_policy_loss on one process with the whole weight: the
                              single-device call (one row per shape, P = 1)
  sppo_vocab_parallel         the same call with each rank's weight shard (V/P, H), process_group= and
                              vocab_start=: the loss of the unsharded call on every rank, the hidden states'
                              gradient all-reduced inside, the weight's gradient a local shard
  torch_loss_parallel         what a DTensor tensor-parallel user runs today: an nn.Linear lm_head under
                              ColwiseParallel(use_local_output=False) (hidden replicated, weight Shard(0)),
                              so the logits are a DTensor (N, V) sharded on the vocabulary, per-token
                              log-probs -F.cross_entropy(logits, targets, reduction="none") inside
                              torch.distributed.tensor.parallel.loss_parallel(), then the same loss stage
                              (sppo_fast.policy_loss on (B, T)); the (N, V/P) logits are materialised
  megatron_vocab_parallel_ce  Megatron-core's tensor_parallel.vocab_parallel_cross_entropy over the local
                              logits hidden @ weight_shard.T (materialised), -ce as log-probs, the same loss
                              stage; the hidden states' gradient all-reduced afterwards, as Megatron's
                              ColumnParallelLinear does in its backward. Megatron-core is not a dependency:
                              `pip install torch==2.13.0 megatron-core` (0.16 takes its group from
                              parallel_state.initialize_model_parallel, which runs on gloo)
torch_loss_parallel and megatron_vocab_parallel_ce give no entropy (the DAPO loss does not use it), so they
do less work than sppo_fast, which also returns the per-token entropy.

How it measures. Every (shape, implementation, P) runs in its own child process (sppo_fast/bench/harness.py:
run_in_child), which starts P rank processes (torch.multiprocessing, spawn; gloo over a file store; each
rank dies with it) with `--threads` torch threads each (1 by default: on a 2-core machine 2 ranks fill it
and 4 ranks are oversubscribed, two ranks per core, so their times are not per-device times; memory is
per process and still meaningful). Each rank builds the same inputs from a counter-based hash (no random
generator state: the unsharded weight's rows and each shard's rows are the same numbers), runs a first
call (a warm-up, also the one whose collectives are counted) and `--warmup` more, then the median of
`--reps` steps (a barrier before each), wall and CPU time of the process; a step is the loss forward and
torch.autograd.grad of it with respect to the hidden states and the weight (shard), the gradients
returned. Memory: harness.peak_extra_mib, the rank's resident high-water mark above its resident set
before one step (glibc made to map every allocation of 64 KiB or more on its own and to return freed
memory at once), the step's results included: the hidden states' gradient and the weight's gradient
(shard). The rows give the largest over the ranks (each rank's figures are in the JSON).
Communication: the first step runs with torch.distributed's collectives (all_reduce, all_gather,
all_gather_into_tensor, all_gather_single, reduce_scatter_tensor, broadcast, ...; all_gather_object
counted as its pickle's bytes) wrapped, counting the bytes of the tensor each rank hands to each
collective (its contribution: an all_reduce of S bytes counts S; the wire traffic of a ring all-reduce is
2 (P - 1) / P x S), separately for the forward (the loss call: sppo_fast's one-pass plan computes the
gradients there, so its hidden-gradient all-reduce falls in it) and the backward (autograd.grad), per
token per rank. DTensor's collectives go through torch's functional collectives, which that wrapper does
not see: torch_loss_parallel's bytes are not counted. Cases whose predicted memory (all ranks together)
exceeds what the machine has available are skipped with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import inspect
import json
import math
import os
import signal
import sys
import tempfile
import time

from sppo_fast.bench import harness
from sppo_fast.bench.harness import add_load_arguments, load_policy

IMPLS = ("sppo_unsharded", "sppo_vocab_parallel", "torch_loss_parallel", "megatron_vocab_parallel_ce")
DISTRIBUTED = IMPLS[1:]
RANKS = (2, 4)
VOCAB = 151936
SHAPES = ("fp32:8192:512", "bf16:8192:512", "fp32:512:4096", "bf16:512:4096")  # dtype:N:H
SEQ_LEN = 512  # tokens per sequence: N = B x SEQ_LEN
MEGATRON_INSTALL = "pip install torch==2.13.0 megatron-core"
# The loss stage's peak per rank in logits-sized (N x V/P in the logits' dtype) units, until a smaller N of
# the same case was measured (then scaled from it linearly): loss_parallel holds the logits, their
# log-softmax and the backward's gradients (about 5 at small sizes); Megatron the logits (an fp32 copy at
# bf16: counted as 2 more) and its softmax, reused as the gradient. Over-estimates skip, never crash.
LOGITS_UNITS = {"torch_loss_parallel": 7.0, "megatron_vocab_parallel_ce": 3.0}
MEM_MARGIN_GIB = 2.0
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "reduce", "all_to_all", "all_to_all_single", "gather", "scatter",
               "all_gather_object", "broadcast_object_list")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="sppo-fast bench --vocab-parallel", description=__doc__.split("\n\n")[0])
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--ranks", nargs="+", type=int, default=list(RANKS), help="process-group sizes P")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), help="dtype:N:H (N tokens, hidden H)")
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--seq-len", type=int, default=SEQ_LEN, help="tokens per sequence (N = B x seq-len)")
    p.add_argument("--reps", type=int, default=2, help="timed steps (their median); each takes seconds at the "
                   "default shapes")
    p.add_argument("--warmup", type=int, default=0, help="untimed steps after the first call (itself untimed, "
                   "a warm-up that also counts the collectives' bytes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--chunk-size", type=int, default=None, help="sppo_fast's chunk_size (default: its plan's)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per case (all its ranks)")
    add_load_arguments(p)
    p.add_argument("--quick", action="store_true", help="small N and V: checks the script in well under a minute")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/vocab-parallel-<machine>.json)")
    p.add_argument("--merge", action="store_true", help="keep the rows of --out that this run does not redo")
    p.add_argument("--report-only", action="store_true", help="rewrite the .md from --out")
    p.add_argument("--note", default="", help="a line for the report")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.vocab, args.seq_len = ["fp32:256:64"], 4096, 64
        if args.ranks == list(RANKS):
            args.ranks = [2]
        args.reps, args.settle = min(args.reps, 2), min(args.settle, 2.0)
    return args


def parse_shape(text):
    dtype, n, h = text.split(":")
    if dtype not in ("fp32", "bf16"):
        raise SystemExit(f"--shapes: dtype must be fp32 or bf16, not {dtype!r}")
    return dtype, int(n), int(h)


# ----------------------------------------------------------------------------------------------------
# Inputs: the same numbers on every rank and in every process, without a generator's state


def _hash_uniform(rows, cols, seed, row0=0, block=4096):
    """(rows, cols) fp32 in [-1, 1): a counter-based hash of (row0 + i, j, seed), built in row blocks. Row r
    of a shard starting at row0 equals row row0 + r of the whole tensor."""
    import torch

    out = torch.empty(rows, cols, dtype=torch.float32)
    j = torch.arange(cols, dtype=torch.int64)
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        i = torch.arange(row0 + start, row0 + stop, dtype=torch.int64)[:, None]
        x = (i * cols + j + seed * 0x9E3779B1) & 0x7FFFFFFF
        x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & 0x7FFFFFFF
        x = ((x ^ (x >> 12)) * 0x297A2D39) & 0x7FFFFFFF
        x = x ^ (x >> 15)
        out[start:stop] = x.to(torch.float32) * (2.0 / 2**31) - 1.0
    return out


def make_inputs(case, rank, world):
    """The step's inputs on one rank: hidden (B, T, H) replicated, the weight rows [start, start + V/P)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[case["dtype"]]
    n, h, v, t = case["tokens"], case["hidden"], case["vocab"], case["seq_len"]
    b = n // t
    rows = v // world
    start = rank * rows
    hidden = _hash_uniform(n, h, seed=1).to(dtype).reshape(b, t, h)
    weight = (_hash_uniform(rows, h, seed=2, row0=start) * (0.1 / math.sqrt(h / 512))).to(dtype)
    targets = ((_hash_uniform(b, t, seed=3) + 1.0) * (v / 2)).long().clamp_(0, v - 1)
    advantages = _hash_uniform(1, b, seed=4).reshape(b)
    return {"hidden": hidden, "weight": weight, "vocab_start": start, "targets": targets,
            "old_logp": torch.full((b, t), -math.log(v)), "advantages": advantages,
            "mask": torch.ones(b, t)}


# ----------------------------------------------------------------------------------------------------
# Counting the bytes handed to torch.distributed's collectives


def _tensor_bytes(x, objects=False):
    """The bytes of a tensor (or a list of them); of a picklable object, its pickle's (objects=True)."""
    import pickle

    import torch

    if objects:
        return len(pickle.dumps(x))
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_tensor_bytes(y) for y in x)
    return 0


# which positional argument (or keyword) is what this rank sends
_SENT = {"all_reduce": (0, "tensor"), "all_gather": (1, "tensor"), "all_gather_into_tensor": (1, "input_tensor"),
         "reduce_scatter": (1, "input_list"), "reduce_scatter_tensor": (1, "input"), "broadcast": (0, "tensor"),
         "reduce": (0, "tensor"), "all_to_all": (1, "input_tensor_list"), "all_to_all_single": (1, "input"),
         "gather": (0, "tensor"), "scatter": (1, "scatter_list"), "all_gather_single": (1, "input_tensor"),
         "all_gather_object": (1, "obj"), "broadcast_object_list": (0, "object_list")}


class CollectiveCounter:
    """Within `with counter:`, every call of a torch.distributed collective adds the bytes of the tensor(s)
    this rank hands to it to counter.bytes[counter.phase] (and a line to counter.calls)."""

    def __init__(self):
        self.phase = "forward"
        self.bytes, self.calls, self._saved = {}, [], []

    def _wrap(self, name, fn):
        index, keyword = _SENT[name]

        def counted(*args, **kwargs):
            sent = kwargs.get(keyword, args[index] if len(args) > index else None)
            n = _tensor_bytes(sent, objects=name.endswith(("_object", "_object_list")))
            self.bytes[self.phase] = self.bytes.get(self.phase, 0) + n
            self.calls.append({"phase": self.phase, "op": name, "bytes": n})
            return fn(*args, **kwargs)

        counted._sppo_counted = True
        return counted

    def __enter__(self):
        import torch.distributed as dist
        from torch.distributed import distributed_c10d

        for module in (dist, distributed_c10d):
            for name in COLLECTIVES:
                fn = getattr(module, name, None)
                if fn is not None and not getattr(fn, "_sppo_counted", False):
                    self._saved.append((module, name, fn))
                    setattr(module, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc):
        for module, name, fn in reversed(self._saved):
            setattr(module, name, fn)
        self._saved.clear()
        return False

    @contextlib.contextmanager
    def during(self, phase):
        self.phase = phase
        yield


# ----------------------------------------------------------------------------------------------------
# The steps: forward + backward, the gradients returned


def has_vocab_parallel():
    """Whether this sppo_fast's fused_linear_policy_loss takes a process group (the vocab-parallel API)."""
    import sppo_fast

    return "process_group" in inspect.signature(sppo_fast.fused_linear_policy_loss).parameters


def _phase(counter, name):
    return counter.during(name) if counter is not None else contextlib.nullcontext()


def sppo_step(case, inp, group):
    import torch

    import sppo_fast

    config = sppo_fast.PolicyLossConfig.preset("dapo")
    hidden = inp["hidden"].requires_grad_(True)
    weight = inp["weight"].requires_grad_(True)
    kw = {"chunk_size": case.get("chunk_size")}
    if case["impl"] == "sppo_vocab_parallel":
        kw.update(process_group=group, vocab_start=inp["vocab_start"])

    def step(counter=None):
        with _phase(counter, "forward"):
            out = sppo_fast.fused_linear_policy_loss(hidden, weight, inp["targets"], inp["old_logp"],
                                                     inp["advantages"], inp["mask"], config, **kw)
        with _phase(counter, "backward"):
            grads = torch.autograd.grad(out.loss, (hidden, weight))
        return out.loss.detach(), grads

    return step


def loss_parallel_step(case, inp, group):
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, loss_parallel, parallelize_module

    import sppo_fast

    config = sppo_fast.PolicyLossConfig.preset("dapo")
    world = torch.distributed.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    b, t, h = inp["hidden"].shape
    local = inp["weight"]
    lm_head = nn.Linear(h, case["vocab"], bias=False, device="meta", dtype=local.dtype)
    parallelize_module(lm_head, mesh, ColwiseParallel(use_local_output=False))  # hidden Replicate -> logits Shard(-1)
    lm_head.weight = nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False))
    hidden = inp["hidden"].reshape(b * t, h).requires_grad_(True)
    targets = inp["targets"].reshape(-1)

    def step(counter=None):
        with loss_parallel():
            logits = lm_head(hidden)  # DTensor (N, V), each rank holding (N, V/P)
            ce = F.cross_entropy(logits, targets, reduction="none")
            logp = -(ce.full_tensor() if isinstance(ce, DTensor) else ce)
            out = sppo_fast.policy_loss(logp.float().reshape(b, t), inp["old_logp"], inp["advantages"], inp["mask"],
                                        config)
            grads = torch.autograd.grad(out.loss, (hidden, lm_head.weight))
        return out.loss.detach(), tuple(g.to_local() if isinstance(g, DTensor) else g for g in grads)

    return step


def megatron_step(case, inp, group):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state  # not a dependency: see MEGATRON_INSTALL
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    import sppo_fast

    world = dist.get_world_size()
    if "tp_group" in inspect.signature(vocab_parallel_cross_entropy).parameters:
        ce_fn = lambda logits, targets: vocab_parallel_cross_entropy(logits, targets, tp_group=group)  # noqa: E731
    else:  # megatron-core 0.16: the group of parallel_state
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
        ce_fn = vocab_parallel_cross_entropy
    config = sppo_fast.PolicyLossConfig.preset("dapo")
    b, t, h = inp["hidden"].shape
    hidden = inp["hidden"].reshape(b * t, h).requires_grad_(True)
    weight = inp["weight"].requires_grad_(True)
    targets = inp["targets"].reshape(-1)  # any leading shape: Megatron views the logits as (-1, V/P)

    def step(counter=None):
        with _phase(counter, "forward"):
            logits = hidden @ weight.t()  # (N, V/P), materialised
            logp = -ce_fn(logits, targets).reshape(b, t)
            out = sppo_fast.policy_loss(logp, inp["old_logp"], inp["advantages"], inp["mask"], config)
        with _phase(counter, "backward"):
            grad_hidden, grad_weight = torch.autograd.grad(out.loss, (hidden, weight))
            dist.all_reduce(grad_hidden, group=group)  # ColumnParallelLinear's backward all-reduce
        return out.loss.detach(), (grad_hidden, grad_weight)

    return step


STEPS = {"sppo_unsharded": sppo_step, "sppo_vocab_parallel": sppo_step, "torch_loss_parallel": loss_parallel_step,
         "megatron_vocab_parallel_ce": megatron_step}


# ----------------------------------------------------------------------------------------------------
# A rank


def _die_with_parent():
    """The rank ends when its launcher does (a timed-out case leaves no orphan)."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_rank(case, rank, world, group):
    import torch
    import torch.distributed as dist

    inp = make_inputs(case, rank, world)
    if case["impl"] == "sppo_vocab_parallel" and not has_vocab_parallel():
        raise RuntimeError("this sppo_fast's fused_linear_policy_loss takes no process_group (the vocab-parallel "
                           "API has not landed)")
    t0 = time.perf_counter()
    step = STEPS[case["impl"]](case, inp, group)
    barrier = dist.barrier if world > 1 else None
    counter = CollectiveCounter()
    with counter:  # the first call (a warm-up) also counts the collectives' bytes
        loss, grads = step(counter)
    first_s = time.perf_counter() - t0
    for _ in range(case["warmup"]):
        step()
    wall, cpu = harness.median_ms(step, case["reps"], before=barrier)
    if barrier:
        barrier()
    peak, held = harness.peak_extra_mib(step)
    comm = {}
    if world > 1 and case["impl"] != "torch_loss_parallel":
        n = case["tokens"]
        comm = {"comm_bytes": dict(counter.bytes),
                "comm_bytes_per_token": {k: round(v / n, 2) for k, v in counter.bytes.items()},
                "comm_calls": summarise_calls(counter.calls)}
    grad_hidden, grad_weight = grads
    return {"rank": rank, "first_call_s": round(first_s, 3), "step_ms": round(wall, 1), "step_cpu_ms": round(cpu, 1),
            "peak_mib": round(peak, 1), "pool_held_mib": round(held, 1), "loss": float(loss),
            "grad_hidden_norm": float(grad_hidden.float().norm()),
            "grad_weight_sq": float(grad_weight.float().pow(2).sum()), "torch_threads": torch.get_num_threads(),
            **comm}


def summarise_calls(calls):
    """[{phase, op, calls, bytes}] in order of first appearance."""
    out = {}
    for c in calls:
        row = out.setdefault((c["phase"], c["op"]), {"phase": c["phase"], "op": c["op"], "calls": 0, "bytes": 0})
        row["calls"] += 1
        row["bytes"] += c["bytes"]
    return list(out.values())


def _rank_entry(rank, case, world, store, out_dir):
    """torch.multiprocessing's target: one rank of one case, its result to out_dir/rank<r>.json."""
    _die_with_parent()
    harness._faithful_rss()
    import torch
    import torch.distributed as dist

    torch.set_num_threads(case["threads"])
    group = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=case["timeout"]))
        group = dist.group.WORLD
    try:
        result = run_rank(case, rank, world, group)
    finally:
        if world > 1:
            dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


# ----------------------------------------------------------------------------------------------------
# The case's process (harness.run_in_child): starts the ranks, gathers their rows


def run_case_ranks(case):
    import torch.multiprocessing as mp

    world = case["ranks"]
    with tempfile.TemporaryDirectory(prefix="sppo-vp-") as tmp:
        store = os.path.join(tmp, "store")
        ctx = mp.start_processes(_rank_entry, args=(case, world, store, tmp), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + case["timeout"]
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    if proc.is_alive():
                        proc.kill()
                raise TimeoutError(f"the ranks ran past {case['timeout']:g} s")
        ranks = []
        for r in range(world):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
    return summarise_ranks(ranks)


def summarise_ranks(ranks):
    """The case's row from its ranks': the slowest rank's median, the largest peak, rank 0's bytes."""
    row = {"step_ms": max(r["step_ms"] for r in ranks), "step_cpu_ms": max(r["step_cpu_ms"] for r in ranks),
           "peak_mib": max(r["peak_mib"] for r in ranks), "pool_held_mib": max(r["pool_held_mib"] for r in ranks),
           "first_call_s": max(r["first_call_s"] for r in ranks), "loss": ranks[0]["loss"],
           "loss_spread_over_ranks": max(r["loss"] for r in ranks) - min(r["loss"] for r in ranks),
           "grad_hidden_norm": ranks[0]["grad_hidden_norm"],
           "grad_weight_norm": math.sqrt(sum(r["grad_weight_sq"] for r in ranks)),
           "torch_threads": ranks[0]["torch_threads"], "per_rank": ranks}
    if "comm_bytes_per_token" in ranks[0]:
        row["comm_bytes_per_token"] = ranks[0]["comm_bytes_per_token"]
        row["comm_calls"] = ranks[0]["comm_calls"]
    return row


def child_main(case_json):
    return harness.report_result(run_case_ranks, case_json, lambda exc: _last_line(exc)[:400])


def _last_line(exc):
    """The root cause of a rank's failure (torch.multiprocessing passes its traceback as text)."""
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else repr(exc)


# ----------------------------------------------------------------------------------------------------
# The parent: the grid, skips, the report


def megatron_available():
    from importlib.util import find_spec

    try:
        return find_spec("megatron.core") is not None
    except ModuleNotFoundError:
        return False


def predicted_gib(case, measured):
    """All ranks' predicted peak together: the weight's gradient (shard) and the hidden states' gradient, plus
    the logits-sized temporaries of the implementations that materialise them (scaled from a smaller N of
    the same case where one was measured)."""
    p, n, h, v = case["ranks"], case["tokens"], case["hidden"], case["vocab"]
    key = (case["impl"], case["dtype"], h, p)
    if measured.get(key):
        n0, mib0 = max(measured[key])
        per_rank = mib0 / 1024 * n / n0
    else:
        logits = n * (v // p) * (2 if case["dtype"] == "bf16" else 4)
        per_rank = (4 * (v // p) * h * 2 + 8 * n * h + LOGITS_UNITS.get(case["impl"], 0.0) * logits) / 2**30
        per_rank += 0.25
    return per_rank * p, per_rank


def skip_reason(case, measured):
    if case["impl"] == "megatron_vocab_parallel_ce" and not megatron_available():
        return f"not run: megatron-core is not installed ({MEGATRON_INSTALL})"
    if case["vocab"] % case["ranks"]:
        return f"not run: V = {case['vocab']} is not divisible by P = {case['ranks']}"
    total, per_rank = predicted_gib(case, measured)
    case["predicted_gib_per_rank"] = round(per_rank, 2)
    free = _mem_available_gib() - MEM_MARGIN_GIB
    if total > free:
        return (f"skipped: predicted {per_rank:.1f} GiB per rank, {total:.1f} GiB for the {case['ranks']} ranks "
                f"> {free:.1f} GiB available now")
    return None


def _mem_available_gib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


def cases(args):
    out = []
    for shape in args.shapes:
        dtype, n, h = parse_shape(shape)
        for impl in args.impls:
            for p in ([1] if impl == "sppo_unsharded" else sorted(args.ranks)):
                out.append({"impl": impl, "ranks": p, "dtype": dtype, "tokens": n, "hidden": h, "vocab": args.vocab,
                            "seq_len": min(args.seq_len, n), "reps": args.reps, "warmup": args.warmup,
                            "threads": args.threads, "chunk_size": args.chunk_size, "timeout": args.timeout})
    return out


def _key(row):
    return (row["impl"], row["ranks"], row["dtype"], row["tokens"], row["hidden"], row["vocab"])


def default_out():
    return os.path.join(harness.results_dir(), f"vocab-parallel-{harness.machine_slug()}.json")


def targets(rows):
    """The memory targets at each (dtype, N, H, V) with P = 2 (and every P measured): sppo_vocab_parallel's peak
    per rank against the unsharded call's / P and against loss_parallel's / 8."""
    by = {_key(r): r for r in rows if r.get("status") == "ok"}
    out = []
    for key, r in sorted(by.items()):
        impl, p, dtype, n, h, v = key
        if impl != "sppo_vocab_parallel":
            continue
        t = {"dtype": dtype, "tokens": n, "hidden": h, "vocab": v, "ranks": p, "vp_peak_mib": r["peak_mib"]}
        un = by.get(("sppo_unsharded", 1, dtype, n, h, v))
        if un:
            t["unsharded_peak_mib"] = un["peak_mib"]
            t["x_below_unsharded"] = round(un["peak_mib"] / max(r["peak_mib"], 1e-9), 2)
            t["meets_P_x"] = t["x_below_unsharded"] >= p
        lp = by.get(("torch_loss_parallel", p, dtype, n, h, v))
        if lp:
            t["loss_parallel_peak_mib"] = lp["peak_mib"]
            t["x_below_loss_parallel"] = round(lp["peak_mib"] / max(r["peak_mib"], 1e-9), 2)
            t["meets_8x"] = t["x_below_loss_parallel"] >= 8
        mg = by.get(("megatron_vocab_parallel_ce", p, dtype, n, h, v))
        if mg:
            t["x_below_megatron"] = round(mg["peak_mib"] / max(r["peak_mib"], 1e-9), 2)
        out.append(t)
    return out


def agreement(rows):
    """The largest |loss - unsharded loss| (relative) of each implementation over the shapes both ran."""
    ok = [r for r in rows if r.get("status") == "ok"]
    ref = {(r["dtype"], r["tokens"], r["hidden"], r["vocab"]): r for r in ok if r["impl"] == "sppo_unsharded"}
    out = {}
    for r in ok:
        u = ref.get((r["dtype"], r["tokens"], r["hidden"], r["vocab"]))
        if u is None or r["impl"] == "sppo_unsharded":
            continue
        rel = abs(r["loss"] - u["loss"]) / max(abs(u["loss"]), 1e-12)
        gw = abs(r["grad_weight_norm"] - u["grad_weight_norm"]) / max(u["grad_weight_norm"], 1e-12)
        gh = abs(r["grad_hidden_norm"] - u["grad_hidden_norm"]) / max(u["grad_hidden_norm"], 1e-12)
        k = f"{r['impl']} P={r['ranks']}"
        prev = out.get(k, {"loss_rel": 0.0, "grad_weight_norm_rel": 0.0, "grad_hidden_norm_rel": 0.0})
        out[k] = {"loss_rel": max(prev["loss_rel"], rel), "grad_weight_norm_rel": max(prev["grad_weight_norm_rel"], gw),
                  "grad_hidden_norm_rel": max(prev["grad_hidden_norm_rel"], gh)}
    return {k: {kk: float(f"{vv:.3g}") for kk, vv in v.items()} for k, v in out.items()}


def _cell_comm(r):
    c = r.get("comm_bytes_per_token")
    if not c:
        return "not counted (DTensor functional collectives)" if r["impl"] == "torch_loss_parallel" and r["ranks"] > 1 \
            else "-"
    return f"fwd {c.get('forward', 0):g} / bwd {c.get('backward', 0):g}"


def markdown(report):
    env, rows, s = report["environment"], report["results"], report["settings"]
    cpu = env["cpu"]
    cores = env["cores"]
    lines = [f"# Vocabulary-parallel fused policy loss, per rank: {cpu}, {cores} cores", "",
             f"{cpu} ({cores} cores, {env.get('cpu_capability', '')}), torch {env['torch']}, gloo backend, "
             f"{s['threads']} torch thread(s) per rank (`torch.set_num_threads({s['threads']})`), "
             f"`python bench/bench_vocab_parallel.py` ({env['date']}). DAPO preset, V = {s['vocab']}, sequences of "
             f"{s['seq_len']} tokens, every token valid. A step = loss forward + backward to the hidden states and the "
             f"weight (shard): median of {s['reps']} after {s['warmup']} warm-up (the slowest rank's median). Peak = "
             "the rank's resident memory above its inputs during one step, the gradients included (the largest "
             "rank's). Comm = bytes of the tensors each rank hands to torch.distributed collectives per token "
             "(forward / backward). Method: the docstring of `sppo_fast/bench/vocab_parallel.py`.", ""]
    if cores and any(r["ranks"] * s["threads"] > cores for r in rows):
        lines += [f"**Oversubscribed**: this machine has {cores} cores; rows with P x threads > {cores} (P = 4 here) "
                  "share cores between ranks, so their step times are not what P devices would give (memory is "
                  "per process and unaffected). torch_loss_parallel and megatron_vocab_parallel_ce compute no "
                  "entropy (less work than sppo_fast).", ""]
    shapes = sorted({(r["dtype"], r["tokens"], r["hidden"], r["vocab"]) for r in rows},
                    key=lambda k: (k[2], -k[1], k[0]))
    for dtype, n, h, v in shapes:
        lines += [f"## {dtype}, N = {n}, H = {h}, V = {v} ({cpu})", "",
                  f"| impl | P | step ms ({cpu}) | CPU ms | peak MiB / rank | loss | comm bytes/token/rank |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted((r for r in rows if (r["dtype"], r["tokens"], r["hidden"], r["vocab"]) == (dtype, n, h, v)),
                        key=lambda r: (IMPLS.index(r["impl"]), r["ranks"])):
            if r.get("status") != "ok":
                lines.append(f"| {r['impl']} | {r['ranks']} | {r.get('status', '?').replace('|', '/')[:300]} | | | | |")
                continue
            over = " (oversubscribed)" if cores and r["ranks"] * s["threads"] > cores else ""
            busy = " (busy)" if r.get("load_flag") else ""
            lines.append(f"| {r['impl']} | {r['ranks']} | {r['step_ms']:.0f}{over}{busy} | {r['step_cpu_ms']:.0f} | "
                         f"{r['peak_mib']:.0f} | {r['loss']:.6g} | {_cell_comm(r)} |")
        lines.append("")
    tg = report.get("targets", [])
    if tg:
        lines += [f"## Memory targets ({cpu})", "",
                  "sppo_vocab_parallel's peak per rank against the unsharded fused call (target: >= P x lower, the "
                  "weight-gradient shard included) and against loss_parallel over DTensor logits (target: >= 8x "
                  "lower at N = 8192, V = 151936, P = 2).", "",
                  "| dtype | N | H | P | vp peak MiB | unsharded MiB | x lower (>= P?) | loss_parallel MiB | "
                  "x lower (>= 8?) | x lower than Megatron |", "|---|---|---|---|---|---|---|---|---|---|"]
        for t in tg:
            def yes(flag):
                return "" if flag is None else (" yes" if flag else " **no**")
            def mib(key, t=t):
                return f"{t[key]:.0f}" if key in t else "-"
            lines.append(f"| {t['dtype']} | {t['tokens']} | {t['hidden']} | {t['ranks']} | {t['vp_peak_mib']:.0f} | "
                         f"{mib('unsharded_peak_mib')} | {t.get('x_below_unsharded', '-')}"
                         f"{yes(t.get('meets_P_x'))} | {mib('loss_parallel_peak_mib')} | "
                         f"{t.get('x_below_loss_parallel', '-')}{yes(t.get('meets_8x'))} | "
                         f"{t.get('x_below_megatron', '-')} |")
        lines.append("")
    ag = report.get("agreement", {})
    if ag:
        lines += ["Agreement with the unsharded call (largest relative difference over the shapes): "
                  + "; ".join(f"{k}: loss {v['loss_rel']:.2g}, |grad W| {v['grad_weight_norm_rel']:.2g}, "
                              f"|grad h| {v['grad_hidden_norm_rel']:.2g}" for k, v in ag.items()) + ".", ""]
    calls = [r for r in rows if r.get("status") == "ok" and r.get("comm_calls")]
    if calls:
        lines.append(f"Collectives per step (rank 0; {cpu}):")
        seen = set()
        for r in calls:
            k = (r["impl"], r["ranks"], r["hidden"], r["dtype"])
            if k in seen:
                continue
            seen.add(k)
            lines.append(f"- {r['impl']} P={r['ranks']} {r['dtype']} N={r['tokens']} H={r['hidden']}: "
                         + ", ".join(f"{c['phase']} {c['op']} x{c['calls']} ({c['bytes']} B)" for c in r["comm_calls"]))
        lines.append("")
    if report.get("note"):
        lines += [f"Note: {report['note']}", ""]
    return "\n".join(lines)


def write_reports(report, out):
    report["targets"] = targets(report["results"])
    report["agreement"] = agreement(report["results"])
    stem = harness.save_report(report, out, markdown)
    print(f"wrote {out}, {stem}.md")


def run(args):
    """The rows of every case of args, in order (smaller N first within a case, to scale predictions)."""
    policy = load_policy(args)
    rows, measured = [], {}
    for case in sorted(cases(args), key=lambda c: (c["hidden"], c["tokens"], c["dtype"], IMPLS.index(c["impl"]),
                                                   c["ranks"])):
        reason = skip_reason(case, measured)
        if reason:
            row = dict(case, status=reason)
        else:
            row = harness.run_in_child("sppo_fast.bench.vocab_parallel", case, case, case["timeout"] + 120,
                                       load=policy)
            if row.get("status") == "ok":
                measured.setdefault((case["impl"], case["dtype"], case["hidden"], case["ranks"]), []).append(
                    (case["tokens"], row["peak_mib"]))
        row["cpu"] = harness.cpu_model()
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("per_rank", "comm_calls")}), flush=True)
    return rows


def main(argv=None):
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    out = args.out or default_out()
    if args.report_only:
        with open(out) as f:
            report = json.load(f)
        write_reports(report, out)
        return 0
    settings = {k: v for k, v in vars(args).items() if k not in ("report_only",)}
    report = {"environment": dict(harness.environment(), torch_threads=args.threads,
                                  megatron_core=_megatron_version(), vocab_parallel_api=has_vocab_parallel()),
              "settings": settings, "results": [], "method": __doc__.split("How it measures.")[1].strip(),
              "note": args.note}
    print(json.dumps(report["environment"]), flush=True)
    report["results"] = run(args)
    if args.merge and os.path.exists(out):
        with open(out) as f:
            previous = json.load(f)
        fresh = {_key(r) for r in report["results"]}
        report["results"] = [r for r in previous["results"] if _key(r) not in fresh] + report["results"]
        report["runs"] = previous.get("runs", [previous["settings"]]) + [settings]
    if args.quick and args.out is None:
        print(markdown(dict(report, targets=targets(report["results"]), agreement=agreement(report["results"]))))
        return 0
    write_reports(report, out)
    return 0


def _megatron_version():
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megatron-core")
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
