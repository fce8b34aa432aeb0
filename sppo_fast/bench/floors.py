"""The machine's floors for the ops benchmark, measured in the same run as the times they bound (each
in its own child process, with the benchmark's thread count).

Logits path (`token_logprobs`, `fused_policy_loss`: one (N, V) logits tensor in, its gradient out):
  stream floor   the bytes the op must move over the machine's streaming bandwidth. The forward reads
                 the logits once; forward+backward reads them twice and writes the gradient once (in
                 place: reads them twice and overwrites them once), all in the logits' dtype: 1 and 3
                 streams of N x V elements. Bandwidth: `dst.copy_(src)` of an fp32 tensor of 4x the
                 largest cache (at least 1 GiB), counted as read + write (2 x its bytes), the best of 7
                 copies after one that touches the pages.
  exp floor      the time of the op's exps (one per logit in the forward, one more in the backward) at
                 the rate of our own vectorised exp on a cache-resident block. That rate is the native
                 forward kernel's (`sppo_fast.token_logprobs`, log-prob and entropy, under no_grad) on
                 blocks small enough to run on one thread from L2: rows of 4096 logits, 4, 8, ..., 28
                 rows (64 to 448 KiB in fp32), each timed as the best of 15 batches of 50 calls (the
                 sizes interleaved), the time per logit the median slope between two sizes (Theil-Sen:
                 it cancels the per-call overhead and ignores a size hit by a burst of other work),
                 the rate times the thread count. The forward does a little more per logit than the
                 exp (the running max and the sums), so this floor is, if anything, high.
  floor          the larger of the two (memory and exps could at best overlap completely).
Linear path (`fused_linear`, hidden (N, H) x weight (V, H)):
  matmul floor   the three matmuls of the op, timed with `torch.mm` (into preallocated outputs) on the
                 same shapes, dtype and threads: logits (N, H) x (H, V), the hidden's gradient (N, V) x
                 (V, H) and the weight's gradient (V, N) x (N, H), the same multiply-adds each; the best
                 of `reps` calls of each. The forward's floor is the first alone. A bf16/fp16 case on a
                 CPU without dot products of that dtype (sppo_fast.chunks.narrow_products_are_slow) is
                 timed on fp32 copies of the operands, the fastest exact form there and the one the
                 linear path takes (torch's narrow product falls back to a reference gemm 30-1000x
                 slower, no floor); the result records which (`operands`).
"% of floor" = floor / measured time: 100% is the machine's limit.
"""

from __future__ import annotations

import json
import time

import torch

from sppo_fast.chunks import narrow_products_are_slow

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EXP_ROW = 4096  # logits per row of the exp-rate blocks
EXP_ROWS = (4, 8, 12, 16, 20, 24, 28)  # rows of the blocks: one thread's work (the kernel splits 256k logits a task)
EXP_BATCHES, EXP_CALLS = 15, 50
STREAM_MIN_BYTES = 2**30
STREAM_REPS = 7


def _best_s(fn, calls, batches):
    best = float("inf")
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def stream_bandwidth():
    """{"stream_gbps", "stream_bytes"}: the copy bandwidth of a tensor much larger than the caches."""
    from sppo_fast.bench.harness import cache_sizes

    largest = max(cache_sizes().values(), default=0)
    nbytes = max(STREAM_MIN_BYTES, 4 * largest)
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
        nbytes = min(nbytes, max(STREAM_MIN_BYTES // 4, avail // 6))  # two tensors, with room to spare
    except (OSError, StopIteration):
        pass
    n = nbytes // 4
    src = torch.ones(n)
    dst = torch.empty(n)
    dst.copy_(src)  # touches every page of both
    seconds = _best_s(lambda: dst.copy_(src), 1, STREAM_REPS)
    return {"stream_gbps": round(2 * n * 4 / seconds / 1e9, 2), "stream_bytes": n * 4}


def exp_rate(dtype):
    """Logits per second that the native forward kernel processes from cache, all threads (see above)."""
    import sppo_fast as sf

    gen = torch.Generator().manual_seed(0)
    blocks = []
    for rows in EXP_ROWS:
        logits = (torch.randn(rows, EXP_ROW, generator=gen) * 2.0).to(DTYPES[dtype])
        blocks.append((rows * EXP_ROW, logits, torch.randint(0, EXP_ROW, (rows,), generator=gen)))
    best = [float("inf")] * len(blocks)
    with torch.no_grad():
        for _ in range(EXP_BATCHES):  # the sizes interleaved: a burst of other work hits them alike
            for i, (_, logits, targets) in enumerate(blocks):
                sf.token_logprobs(logits, targets, return_entropy=True)  # the block back in cache
                t0 = time.perf_counter()
                for _ in range(EXP_CALLS):
                    sf.token_logprobs(logits, targets, return_entropy=True)
                best[i] = min(best[i], (time.perf_counter() - t0) / EXP_CALLS)
    sizes = [b[0] for b in blocks]
    return dict(rate_from_blocks(sizes, best, torch.get_num_threads()),
                exp_block_us={n: round(t * 1e6, 2) for n, t in zip(sizes, best)})


def rate_from_blocks(sizes, seconds, threads):
    """{"exp_per_s", "exp_per_s_one_thread", "exp_fit_error"} from the best time of each block size: the
    Theil-Sen slope (robust to one block timed during a burst) and, as `exp_fit_error`, the largest
    distance of a block's time from that line, relative to the time. A burst that hits several blocks
    bends the line and can make the slope, and the rate, several times too high (fp32 once read 22.9 G/s
    beside 8.3 G/s measured after the cases, with an error of 0.19 against 0.009): best_floors trusts
    only a measurement whose error is small."""
    import statistics

    slopes = [(seconds[j] - seconds[i]) / (sizes[j] - sizes[i]) for i in range(len(sizes))
              for j in range(i + 1, len(sizes))]
    per_logit = statistics.median(slopes)
    if per_logit <= 0:  # noise larger than the work: fall back to the largest block alone
        per_logit = seconds[-1] / sizes[-1]
    intercept = statistics.median(t - per_logit * n for n, t in zip(sizes, seconds))
    error = max(abs(t - intercept - per_logit * n) / t for n, t in zip(sizes, seconds))
    return {"exp_per_s": round(threads / per_logit), "exp_per_s_one_thread": round(1 / per_logit),
            "exp_fit_error": round(error, 3)}


def machine(dtypes):
    """The stream bandwidth and, per dtype, the native exp rate."""
    out = dict(stream_bandwidth(), threads=torch.get_num_threads())
    out["exp"] = {d: exp_rate(d) for d in dtypes}
    return out


def matmul_floor(tokens, hidden, vocab, dtype, reps):
    """Best-of-reps ms of the linear path's three torch.mm (see the module docstring)."""
    dt = DTYPES[dtype]
    if narrow_products_are_slow(dt, torch.device("cpu")):
        dt = torch.float32
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=gen).to(dt)
    w = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(dt)
    g = (torch.randn(tokens, vocab, generator=gen) * 1e-3).to(dt)
    logits, grad_h, grad_w = (torch.empty(tokens, vocab, dtype=dt), torch.empty(tokens, hidden, dtype=dt),
                              torch.empty(vocab, hidden, dtype=dt))
    calls = {"logits": lambda: torch.mm(h, w.t(), out=logits),
             "grad_hidden": lambda: torch.mm(g, w, out=grad_h),
             "grad_weight": lambda: torch.mm(g.t(), h, out=grad_w)}
    ms = {}
    for name, fn in calls.items():
        fn()
        ms[name] = round(_best_s(fn, 1, reps) * 1e3, 3)
    return {"mm_ms": ms, "mm3_ms": round(sum(ms.values()), 3), "threads": torch.get_num_threads(),
            "operands": str(dt).removeprefix("torch.")}


def child_main(payload_json):
    payload = json.loads(payload_json)
    if payload.get("threads"):
        torch.set_num_threads(payload["threads"])
    try:
        if payload["kind"] == "machine":
            out = machine(payload["dtypes"])
        else:
            out = matmul_floor(payload["tokens"], payload["hidden"], payload["vocab"], payload["dtype"],
                               payload.get("reps", 5))
        out["status"] = "ok"
    except Exception as exc:  # the floors are reported missing, never fatal to the run
        out = {"status": f"error: {type(exc).__name__}: {str(exc)[:300]}"}
    print("RESULT " + json.dumps(out), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------------
# The floors of one row (in the parent)


def element_size(dtype):
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def logits_floors(tokens, vocab, dtype, machine_floors):
    """{fwd, fwd_bwd} -> {"stream_ms", "exp_ms", "floor_ms"} for an op on (tokens, vocab) logits."""
    elements = tokens * vocab
    gbps = machine_floors.get("stream_gbps")
    rate = machine_floors.get("exp", {}).get(dtype, {}).get("exp_per_s")
    out = {}
    for phase, streams, exps in (("fwd", 1, 1), ("fwd_bwd", 3, 2)):
        f = {"bytes": streams * elements * element_size(dtype)}
        if gbps:
            f["stream_ms"] = round(f["bytes"] / (gbps * 1e9) * 1e3, 2)
        if rate:
            f["exp_ms"] = round(exps * elements / rate * 1e3, 2)
        parts = [f[k] for k in ("stream_ms", "exp_ms") if k in f]
        if parts:
            f["floor_ms"] = max(parts)
        out[phase] = f
    return out


def linear_floors(mm):
    """{fwd, fwd_bwd} -> {"floor_ms"} from a matmul_floor result."""
    if not mm or mm.get("status") != "ok":
        return {}
    return {"fwd": {"floor_ms": mm["mm_ms"]["logits"]}, "fwd_bwd": {"floor_ms": mm["mm3_ms"]}}


def percent(floor_ms, ms):
    return round(100.0 * floor_ms / ms, 1) if floor_ms and ms else None


def floors_of_row(row, machine_floors, matmul):
    """The row with its floors and "% of floor" (fwd and fwd_bwd) filled in."""
    if row.get("status") != "ok":
        return row
    if row["op"] == "fused_linear":
        floors = linear_floors(matmul.get((row["tokens"], row.get("hidden"), row["vocab"], row["dtype"])))
    else:
        floors = logits_floors(row["tokens"], row["vocab"], row["dtype"], machine_floors or {})
    row = dict(row, floors=floors)
    for phase in ("fwd", "fwd_bwd"):
        f = floors.get(phase, {})
        row[f"{phase}_pct_of_floor"] = percent(f.get("floor_ms"), row.get(f"{phase}_ms"))
        if "stream_ms" in f:
            row[f"{phase}_pct_of_stream_floor"] = percent(f["stream_ms"], row.get(f"{phase}_ms"))
    return row

