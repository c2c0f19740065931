"""Device activity from ``jax.profiler`` traces: what the devices and the host did in a call."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scripts.common import timed


def profiled_call(call: Callable[[], Any], trace: Path) -> dict[str, Any]:
    """Runs ``call`` once under ``jax.profiler.trace`` into ``trace``: its seconds and
    ``device_activity``; a profiler that fails gives its error instead."""
    import jax

    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # device and XLA host events only: a small file
    try:
        with jax.profiler.trace(str(trace), profiler_options=options):
            _, seconds = timed(call)
        return {"call_seconds": seconds, **device_activity(trace)}
    except Exception as error:  # noqa: BLE001 - a profiler failure loses no rows
        return {"call_seconds": None, "devices": [], "error": str(error).splitlines()[0]}


# Host-side phases of a call in XLA:GPU's traces, by event name on the host plane: the
# longest event whose name starts with each. Where a batch's host time went before the device
# started (docs/results/history.md, "What the traces of runs 3 and 4 show").
HOST_PHASES = {"jitted_call_ms": "PjitFunction(",  # how long the call held the caller
               "input_copy_ms": "H2D Dispatch",  # host arrays into staging buffers
               "program_setup_ms": "Thunks::Initialize"}  # CUDA graphs recorded


def device_activity(trace: Path) -> dict[str, Any]:
    """What the devices did during a traced call, from the XSpace ``jax.profiler.trace`` wrote
    under ``trace``.

    Per device plane (``/device:GPU:N``), over the kernels and copies on its "Stream" lines:
    their count, the span from the first start to the last end, the time any of them ran
    (``busy_ms``, overlaps counted once), ``busy_share`` = busy / span, when the first kernel
    that is not a copy started (``compute_start_ms``, from the span's start: the inputs'
    copies and the program's setup come before it), and the kernels with the most time. A
    busy share well below 1 means the device waited for the host (input copies, launches,
    synchronisation); near 1, the kernels themselves bound it. ``host`` holds the longest
    host events of ``HOST_PHASES`` (None where absent). Devices whose kernels the trace does
    not show (XLA:CPU) give an empty list.
    """
    from jax.profiler import ProfileData

    paths = sorted(trace.glob("**/*.xplane.pb"))
    if not paths:
        return {"devices": [], "error": f"no .xplane.pb under {trace}"}
    devices, host = [], dict.fromkeys(HOST_PHASES)
    for plane in ProfileData.from_file(str(paths[-1])).planes:
        if plane.name == "/host:CPU":
            for line in plane.lines:
                for event in line.events:
                    for phase, prefix in HOST_PHASES.items():
                        if event.name.startswith(prefix):
                            host[phase] = max(host[phase] or 0.0, event.duration_ns / 1e6)
        if not plane.name.startswith("/device:"):
            continue
        events = sorted((event.start_ns, event.start_ns + event.duration_ns, event.name)
                        for line in plane.lines if line.name.startswith("Stream")
                        for event in line.events)
        if not events:
            continue
        busy, covered_until = 0.0, events[0][0]
        per_kernel: dict[str, list[float]] = {}
        for start, end, name in events:
            busy += max(0.0, end - max(start, covered_until))
            covered_until = max(covered_until, end)
            per_kernel.setdefault(name, []).append(end - start)
        span = covered_until - events[0][0]
        compute_start = next((start for start, _, name in events
                              if not name.startswith(("Memcpy", "Memset"))), None)
        top = sorted(per_kernel.items(), key=lambda item: -sum(item[1]))[:10]
        devices.append({"device": plane.name, "kernels": len(events), "span_ms": span / 1e6,
                        "busy_ms": busy / 1e6, "busy_share": busy / span if span else None,
                        "compute_start_ms": None if compute_start is None
                        else (compute_start - events[0][0]) / 1e6,
                        "top_kernels": [{"name": name, "count": len(times),
                                         "total_ms": sum(times) / 1e6} for name, times in top]})
    return {"devices": devices, "host": host}


def keep_traces(traces: Path, out: Path, limit_bytes: int = 15 * 2**20) -> None:
    """Copies the workers' profiler traces (.xplane.pb, for XProf/TensorBoard) into ``out``,
    each up to ``limit_bytes`` (the device tool brings back files of up to 16 MiB)."""
    for path in sorted(traces.glob("*/**/*.xplane.pb")):
        if path.stat().st_size <= limit_bytes:
            target = out / f"{path.relative_to(traces).parts[0]}.xplane.pb"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
