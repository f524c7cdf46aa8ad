"""Helpers shared by the benchmarks and the table tools: machine description, timing, peak memory.

Timing: warm-up calls (graph compilation happens in the first one), then ``repeats`` timed calls, each
ending with the outputs copied to host so asynchronous backends are waited for. Memory: the process's
peak resident set size (VmHWM) during a block, reset before it through /proc/self/clear_refs (Linux);
MindSpore's own allocator statistics are not available for the CPU backend.
"""
import datetime
import math
import os
import platform
import shlex
import subprocess
import sys
import time

import numpy as np


def format_value(value, digits=1):
    """A table cell: ``value`` with ``digits`` decimals, or "—" when it is missing (None or NaN)."""
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def relative_delta(ours, paper):
    """A table cell: how far ``ours`` is from ``paper``, in percent ("—" when either is missing)."""
    if ours is None or paper is None:
        return "—"
    return f"{100.0 * (ours - paper) / paper:+.1f}%"


def _lscpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _meminfo_gib(field="MemTotal"):
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return float("nan")


def environment(device_target=None):
    """Facts about this run: date, CPU, cores, RAM, load, versions, command line."""
    import mindspore as ms
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _lscpu_model(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "ram_gib": round(_meminfo_gib(), 1),
        "load_average": tuple(round(v, 2) for v in load),
        "python": platform.python_version(),
        "mindspore": ms.__version__,
        "numpy": np.__version__,
        "device_target": device_target or ms.get_context("device_target"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
    }


def environment_markdown(env):
    """The ``environment()`` dict as a markdown bullet list."""
    load = ", ".join(f"{v:.2f}" for v in env["load_average"])
    return "\n".join([
        f"- Date: {env['date']}",
        f"- Machine: {env['cpu']} ({env['machine']}), {env['cores']} cores (`nproc`), {env['ram_gib']} GiB RAM",
        f"- Load average (1/5/15 min) when the run started: {load}",
        f"- Software: Python {env['python']}, MindSpore {env['mindspore']}, NumPy {env['numpy']}; "
        f"device_target {env['device_target']}",
        f"- Command: `{env['command']}`",
    ])


def block_until_ready(outputs):
    """Wait for (possibly nested) Tensor outputs by copying them to host."""
    if isinstance(outputs, (tuple, list)):
        for item in outputs:
            block_until_ready(item)
    elif hasattr(outputs, "asnumpy"):
        outputs.asnumpy()
    return outputs


def time_calls(fn, args=(), warmup=2, repeats=10, max_seconds=None, min_repeats=3):
    """Seconds of up to ``repeats`` calls of ``fn(*args)`` after ``warmup`` untimed ones (list of floats).

    With ``max_seconds``, timing stops early once ``min_repeats`` calls are done and the timed calls
    have taken that long in total (keeps slow cases within a time budget).
    """
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 (the first call compiles the graph), got {warmup}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
        if max_seconds is not None and len(times) >= min_repeats and sum(times) >= max_seconds:
            break
    return times


def summarize(times):
    """median, 25th/75th percentiles, min, max (seconds) and the relative spread (IQR / median)."""
    values = np.asarray(times, dtype=np.float64)
    p25, median, p75 = np.percentile(values, [25, 50, 75])
    return {"median": float(median), "p25": float(p25), "p75": float(p75), "min": float(values.min()),
            "max": float(values.max()), "spread": float((p75 - p25) / median) if median > 0 else float("nan"),
            "n": int(values.size)}


def _status_kib(field):
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss_mib():
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else float("nan")


class PeakRSS:
    """Context manager: the process's peak RSS (MiB) inside the block, and its rise over the start.

    ``with PeakRSS() as mem: ...`` then ``mem.peak_mib`` and ``mem.increase_mib``. The peak is reset at
    entry where Linux allows it (``/proc/self/clear_refs``); ``mem.reset_ok`` tells whether it was, else
    the peak is the process's lifetime peak. Memory that the framework's allocator kept from earlier
    blocks counts in ``peak_mib`` but not in ``increase_mib``.
    """

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self.reset_ok = True
        except OSError:
            self.reset_ok = False
        self.start_mib = current_rss_mib()
        return self

    def __exit__(self, *exc):
        kib = _status_kib("VmHWM")
        self.peak_mib = kib / 1024 if kib is not None else float("nan")
        self.increase_mib = self.peak_mib - self.start_mib
        return False
