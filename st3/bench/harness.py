"""The one benchmark harness: its clocks, its interleaving loop and the record of where numbers were taken.

`st3 bench` (real shapes, st3.bench.run) and the launch-bound overhead proxy (`st3 bench --overhead`,
st3.bench.overhead) both time through this module, so "a clock", "a repeat" and "the machine" mean one thing.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import TypeVar

import torch

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")

CLOCKS: dict[str, Callable[[], float]] = {
    "wall": time.perf_counter,
    "process": time.process_time,
    "thread": time.thread_time,
}
"""wall: elapsed time. process: this process's CPU time over all its threads (the work done, not the time spent
descheduled: ratios stay meaningful when other processes share the cores). thread: the calling thread's CPU time
(with one torch thread, all of the model's work). On CUDA only wall time measures the device."""


def check_clock(clock: str, device: torch.device | str) -> None:
    """Refuse an unknown clock, or a CPU clock on a GPU, naming the option."""
    if clock == "cpu":  # 0.1's name, which meant process time in `st3 bench` and thread time in --overhead
        raise ValueError("--clock: 'cpu' is now 'process' (all threads of the process) or 'thread' (this thread)")
    if clock not in CLOCKS:
        raise ValueError(f"--clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    if torch.device(device).type == "cuda" and clock != "wall":
        raise ValueError(f"--clock {clock} measures host CPU time; on a GPU use --clock wall")


def interleaved(
    entries: Sequence[K], run: Callable[[K], R], repeats: int, warmup: int = 1,
    warm: Callable[[K], object] | None = None, tick: Callable[[], object] | None = None,
) -> dict[K, list[R]]:  # fmt: skip
    """`run` each entry `repeats` times in turn (A B C A B C ...), after `warmup` untimed rounds (`warm`, default
    `run`): slow drifts of a shared machine (other processes, thermal state) then hit every entry alike.
    `tick` is called after every run (a progress bar)."""
    warm = warm or run
    for _ in range(warmup):
        for entry in entries:
            warm(entry)
            if tick:
                tick()
    samples: dict[K, list[R]] = {entry: [] for entry in entries}
    for _ in range(repeats):
        for entry in entries:
            samples[entry].append(run(entry))
            if tick:
                tick()
    return samples


def spread(values: list[float]) -> dict[str, float]:
    """Median, min, max and quartiles of repeated measurements (quartiles equal the median for n < 2)."""
    median = statistics.median(values)
    q1, q3 = (statistics.quantiles(values, n=4, method="inclusive")[::2]) if len(values) > 1 else (median, median)
    return {"median": median, "min": min(values), "max": max(values), "q1": q1, "q3": q3, "n": len(values)}


def environment(device: torch.device, started: float) -> dict:
    """Where and when numbers were taken: command, versions, device, threads and the machine's load."""
    import transformers

    return {
        "command": " ".join(sys.argv),
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_end": list(os.getloadavg()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_s": time.time() - started,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    line = _cpuinfo("model name")
    return line.split(":", 1)[1].strip() if line else platform.processor() or "cpu"


def cpu_bf16_note(device: torch.device, dtype: str) -> str:
    """Warn when bf16 runs on a CPU without bf16 matrix instructions (then it is slower than fp32)."""
    if device.type != "cpu" or dtype != "bf16":
        return ""
    flags = _cpuinfo("flags").split()
    if flags and not any(flag in flags for flag in ("avx512_bf16", "amx_bf16")):
        return (
            "this CPU has neither AVX512-BF16 nor AMX-BF16: bf16 matrix products take a slow path "
            "(slower than fp32 here)"
        )
    return ""


def _cpuinfo(key: str) -> str:
    """The first /proc/cpuinfo line starting with `key`, or '' off Linux."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line for line in text.splitlines() if line.startswith(key)), "")
