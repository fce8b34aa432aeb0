"""The benchmarks' harness: a child process per measurement, the resident-set measures of memory, the
machine's description, and its load.

Child processes. `run_in_child(module, payload, row, timeout)` runs `module.child_main(json payload)`
in a fresh interpreter (its own allocator, compilation caches and peak memory, nothing cached from
the cases before), which prints its result as a line `RESULT {json}`.

Memory. There is no allocator counter on CPU, so a child measures its resident set: glibc is first
told to serve every allocation of 64 KiB or more with its own mmap and to return freed memory at once
(`_faithful_rss`: mallopt M_MMAP_THRESHOLD / M_TRIM_THRESHOLD), so that the resident set follows the
live tensors; then the kernel's high-water mark is reset (/proc/self/clear_refs), the call runs, and
`peak_extra_mib` = VmHWM - VmRSS before the call.

Load. Other work on the machine slows every implementation. Each row records the 1-minute load
average before and after it, and what the other processes on the machine used while it ran:
`others_cores`, the machine's busy CPU time (/proc/stat) minus the child's own (its rusage), over the
row's wall time, and `steal_cores`, the time the hypervisor gave the VM's CPUs to someone else. With
a `LoadPolicy`, a row first waits (up to `settle_s`) for the load average to fall to the limit (0.75
per core: 1.5 on 2 cores; the benchmark's own previous row raises it too), and is flagged
(`load_flag`) when it started above the limit, others used more than `others_limit` cores during
it, or the hypervisor took more than `steal_limit` cores (on the 2-core AMD EPYC VM, 0.34-0.64 cores
stolen made the bf16 linear rows 1.2-1.7x slower than in a run without); with `refuse`, a row that
would start above the limit is not run (status "refused: ...").
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time

import torch

from sppo_fast.trainer.resident import reset_peak, status_kib

LOAD_PER_CORE = 0.75  # the load average above which a row is flagged: 1.5 on 2 cores


# ----------------------------------------------------------------------------------------------------
# Memory (in a child)


def _faithful_rss():
    """Make the resident set follow live tensors (see the module docstring)."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.mallopt(m_trim_threshold, 0)
    libc.malloc_trim(0)


def peak_extra_mib(fn):
    """(peak, held) in MiB: resident memory above what was resident before fn at fn's peak (results of
    fn included), and what sppo_fast's gradient pool holds once the results are dropped (it keeps the
    last gradient's block for the next call, as CUDA's caching allocator would; its own exact count,
    not the resident set, which glibc's heap blurs by a few MiB). The pool is emptied first, so that a
    block it kept from an earlier call does not hide in the baseline."""
    from sppo_fast import buffers

    buffers.empty_cache()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    reset_peak()
    base = status_kib("VmRSS")
    out = fn()
    peak = status_kib("VmHWM")
    del out
    gc.collect()
    return (peak - base) / 1024, buffers.cached_bytes() / 2**20


def median_ms(fn, reps, before=None):
    """(wall, CPU) medians in ms over reps calls. The CPU time of the process (all its threads) is
    the work done, which other jobs on the machine inflate much less than the wall time."""
    times, cpu = [], []
    for _ in range(reps):
        if before is not None:
            before()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
        del out
    return statistics.median(times), statistics.median(cpu)


# ----------------------------------------------------------------------------------------------------
# Load


@dataclasses.dataclass(frozen=True)
class LoadPolicy:
    """How a run treats a busy machine (see the module docstring)."""

    limit: float  # 1-minute load average above which a row is flagged
    settle_s: float = 0.0  # before a row, wait up to this long for the load average to fall to the limit
    refuse: bool = False  # do not run a row whose start is above the limit
    others_limit: float = 0.5  # cores the other processes may use, on average, while a row runs
    steal_limit: float = 0.2  # cores the hypervisor may give to other VMs, on average, while a row runs

    @classmethod
    def default(cls, **kw):
        return cls(limit=default_load_limit(), **kw)


def default_load_limit(cores=None):
    return round(LOAD_PER_CORE * (cores or os.cpu_count() or 1), 2)


def add_load_arguments(parser):
    """--max-load, --settle and --refuse-loaded, the flags of a LoadPolicy (see load_policy)."""
    parser.add_argument("--max-load", type=float, default=default_load_limit(),
                        help="flag rows that start above this 1-minute load average (default 0.75 per core)")
    parser.add_argument("--settle", type=float, default=60.0,
                        help="seconds to wait before a row for the load average to fall to --max-load")
    parser.add_argument("--refuse-loaded", action="store_true",
                        help="do not run (record as refused) a row that would start above --max-load")


def load_policy(args):
    return LoadPolicy(limit=args.max_load, settle_s=args.settle, refuse=args.refuse_loaded)


def load_average():
    return round(os.getloadavg()[0], 2)


def settle(policy):
    """Wait (up to policy.settle_s) for the 1-minute load average to fall to the limit; the seconds waited."""
    t0 = time.monotonic()
    while load_average() > policy.limit and time.monotonic() - t0 < policy.settle_s:
        time.sleep(min(5.0, max(0.1, policy.settle_s - (time.monotonic() - t0))))
    return round(time.monotonic() - t0, 1)


def _cpu_jiffies():
    """(busy, steal) seconds of all CPUs since boot, from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, steal / hz


def _children_cpu_s():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def load_flag(row, policy):
    """The reason to distrust a row's times (None: it ran on a quiet machine)."""
    if policy is None:
        return None
    why = []
    if row.get("load_before") is not None and row["load_before"] > policy.limit:
        why.append(f"load average {row['load_before']:g} > {policy.limit:g} at its start")
    if row.get("others_cores") is not None and row["others_cores"] > policy.others_limit:
        why.append(f"other processes used {row['others_cores']:.2f} cores while it ran")
    if row.get("steal_cores") is not None and row["steal_cores"] > policy.steal_limit:
        why.append(f"the hypervisor gave {row['steal_cores']:.2f} cores to other machines while it ran")
    return "; ".join(why) or None


def run_in_child(module, payload, row, timeout, load=None):
    """`module.child_main(json payload)` in a fresh process (its own peak memory, nothing cached from the
    cases before), which prints its result as a line `RESULT {json}`: the row with that result, or with
    a status saying why there is none. The load before and after, and what other processes used while
    it ran, say how busy the machine was; `load` (a LoadPolicy) waits for quiet, flags or refuses."""
    if load is not None:
        row = dict(row, load_wait_s=settle(load))
    row = dict(row, load_before=load_average())
    if load is not None and load.refuse and row["load_before"] > load.limit:
        return dict(row, status=f"refused: load average {row['load_before']:g} > {load.limit:g} "
                                f"after waiting {row['load_wait_s']:g} s")
    code = f"import sys; from {module} import child_main; sys.exit(child_main(sys.argv[1]))"
    (busy0, steal0), child0, t0 = _cpu_jiffies(), _children_cpu_s(), time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(payload)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(row, status=f"timeout after {timeout:g} s")
    wall = time.perf_counter() - t0
    (busy1, steal1), child1 = _cpu_jiffies(), _children_cpu_s()
    row["others_cores"] = round(max(0.0, (busy1 - busy0) - (child1 - child0)) / wall, 3)
    row["steal_cores"] = round((steal1 - steal0) / wall, 3)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return dict(row, status=f"child failed (exit {proc.returncode}): {' | '.join(tail)[:300]}")
    row = dict(row, **json.loads(lines[-1][len("RESULT "):]), load_after=load_average())
    flag = load_flag(row, load)
    if flag:
        row["load_flag"] = flag
    return row


def report_result(measure, case_json, why=lambda exc: str(exc)[:300]):
    """The child's side of run_in_child: prints `RESULT {json}`, measure(case) with status "ok", or the
    error that stopped it (`why`: its text), as one row of the table, never fatal to the whole run."""
    try:
        out = dict(measure(json.loads(case_json)), status="ok")
    except Exception as exc:  # reported in the table
        out = {"status": f"error: {type(exc).__name__}: {why(exc)}"}
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def save_report(report, out, markdown):
    """Writes `report` as JSON at `out` and markdown(report) beside it (.md); returns the path without
    its extension, for whatever else goes beside them."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    stem = os.path.splitext(out)[0]
    with open(stem + ".md", "w") as f:
        f.write(markdown(report))
    return stem


# ----------------------------------------------------------------------------------------------------
# The machine


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def _isa_flags():
    """The vector ISA extensions /proc/cpuinfo lists that matter to these kernels."""
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return sorted(f for f in flags if f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16",
                                                     "amx_bf16"))
    return []


def cpu_model():
    """The CPU's model name as `lscpu` gives it (/proc/cpuinfo where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, env={**os.environ, "LC_ALL": "C"})
        for line in out.stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cache_sizes():
    """{"L1d": bytes, "L2": bytes, "L3": bytes} of CPU 0 (sysfs: the cache one core sees; an L3 shared
    by the whole host is listed whole, which is why streaming tensors are sized from it)."""
    out = {}
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return out
    for entry in entries:
        if not entry.startswith("index"):
            continue
        level, kind, size = (_read(os.path.join(root, entry, f)) for f in ("level", "type", "size"))
        m = re.fullmatch(r"(\d+)([KMG]?)", size)
        if kind == "Instruction" or not m:
            continue
        out[f"L{level}" + ("d" if level == "1" else "")] = int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20,
                                                                             "G": 2**30}[m.group(2)]
    return out


def machine_slug(cpu=None, cores=None, isa=None):
    """bench/results/<slug>: the CPU's model name, torch's vector ISA tier on it and the cores, e.g. "AMD EPYC",
    "AVX512", 2 -> "amd-epyc-avx512-2core". The frequency, "(R)", "CPU", "Processor" and an "N-Core" of the
    model name are dropped. The tier is part of the name because a cloud VM's model name can hide the
    generation: "AMD EPYC" has named both an AVX-512 machine with AVX512-BF16 and an AVX2-only one, whose
    figures must not land in one table. Defaults: this machine."""
    cpu = cpu_model() if cpu is None else cpu
    cores = os.cpu_count() if cores is None else cores
    isa = torch.backends.cpu.get_cpu_capability() if isa is None else isa
    name = re.sub(r"\(r\)|\(tm\)|@.*$|\bcpu\b|\bprocessor\b|\b\d+-core\b", " ", cpu.lower())
    name = re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cpu"
    tier = re.sub(r"[^a-z0-9]+", "", isa.lower()) or "default"
    return f"{name}-{tier}-{cores}core"


def results_dir():
    """bench/results of the repository this package sits in."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(root, "bench", "results")


def environment():
    import sppo_fast as sf

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
           "python": platform.python_version(), "backend": sf.backend_info()["cpu"],
           "thp": _read("/sys/kernel/mm/transparent_hugepage/enabled"), "isa_flags": _isa_flags(),
           "caches": cache_sizes(), "load_average": [round(x, 2) for x in os.getloadavg()]}
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("liger-kernel", "cut-cross-entropy", "trl", "verl", "transformers"):
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            env[pkg] = "not installed"
    return env
