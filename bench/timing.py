"""What every benchmark here shares: median timing with device events, and the JSON record."""
from __future__ import annotations

import json
import statistics
import time
from typing import Any, Callable

import torch


def timed(fn: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds per call (CUDA events on GPU, perf_counter on CPU), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def write_rows(path: str | None, args: Any, rows: list[dict], device: torch.device) -> None:
    """Save the run's arguments, device and rows beside the printed table (BENCHMARKS.md cites these)."""
    if path:
        with open(path, "w") as f:
            json.dump({"args": vars(args) | {"device_name": device_name(device)}, "rows": rows}, f, indent=2)
