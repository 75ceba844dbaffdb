"""Peak resident memory (RSS) of this process, per stage: what the report card's memory table shows.

Linux keeps the peak as VmHWM in /proc/self/status and resets it when "5" is written to /proc/self/clear_refs,
so a speedrun can measure each stage alone in one process. Elsewhere (macOS, or a /proc that refuses the
write) the peak is the process's since it started (getrusage), which only ever grows.
"""
from __future__ import annotations

import resource
import sys


def reset_peak_rss() -> bool:
    """Start measuring the peak from now; False where the peak cannot be reset (it then covers the process)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """The peak RSS in MB since the last reset_peak_rss (since the process started where it cannot reset)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)
