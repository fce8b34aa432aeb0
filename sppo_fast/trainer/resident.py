"""This process's resident memory as the kernel counts it (/proc/self): the current set and its high-water
mark, which `reset_peak` restarts. Read by the TRL job's memory column and by the benchmarks' harness."""

from __future__ import annotations


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now; VmHWM: the high-water mark)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def reset_peak():
    """Restart the kernel's resident high-water mark (VmHWM) from the current resident set."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
