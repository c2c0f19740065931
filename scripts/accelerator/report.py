"""The report: the workers' records assembled into one JSON object, the targets read from its
rows, and the same as Markdown tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scripts.accelerator.plan import MAX_LENGTH, NUM_BEAMS, PIPELINES, WORKERS, Profile
from scripts.accelerator.traces import HOST_PHASES
from scripts.common import jsonable

RESULT_NAME = "accelerator-benchmark"


def assemble(profile: Profile, env: dict[str, Any], setup_seconds: float,
             workers: dict[str, dict[str, Any]], wall: float) -> dict[str, Any]:
    """The JSON report: one entry per part, then the targets of issue 10."""
    def lines(worker: str, kind: str) -> list[dict[str, Any]]:
        record = workers.get(worker, {"lines": []})
        return [{k: v for k, v in line.items() if k != "kind"}
                for line in record["lines"] if line["kind"] == kind]

    def part(names: tuple[str, ...]) -> dict[str, Any]:
        ran = [workers[name] for name in names if name in workers]
        if not ran:
            return {"status": "not run (--parts)"}
        return {"status": "; ".join(f"{name}: {workers[name]['status']}" for name in names
                                    if name in workers),
                "seconds": sum(record["seconds"] for record in ran),
                "skipped": sum((lines(name, "skipped") for name in names), []),
                "errors": sum((lines(name, "error") for name in names), [])}

    for worker in workers:
        for info in lines(worker, "info"):
            env.update({k: v for k, v in info.items() if k not in env})
    report = {
        "profile": profile.name,
        "settings": {"num_beams": NUM_BEAMS, "max_length": MAX_LENGTH,
                     "model": "nlpconnect architecture, random weights" if profile.full_size
                     else "tiny random model"},
        "wall_seconds": wall,
        "setup_seconds": setup_seconds,
        "parts": {
            "environment": {"status": "ok", **env},
            "parity": part(WORKERS["parity"]) | {"rows": lines("parity", "parity")},
            "throughput": part(WORKERS["throughput"]) | {
                "rows": lines("torch_throughput", "throughput")
                + lines("jax_throughput", "throughput"),
                "profiles": lines("jax_throughput", "profile")},
            "end_to_end": part(WORKERS["end_to_end"]) | {
                "pipelines": lines("end_to_end", "pipeline"),
                "device_resize_pixels": lines("end_to_end", "pixels"),
                "decode_scaling": lines("end_to_end", "decode")},
        },
    }
    report["targets"] = targets(report)
    return report


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 10's targets against what this run measured (None where it was not measured)."""
    rows = [row for row in report["parts"]["throughput"]["rows"] if "images_per_second" in row]

    def rate(row: dict[str, Any]) -> float:
        """A row's images/s as a long batch job gets it: ours between the first and the last
        result of batches dispatched one ahead (``streamed_run``) where measured; PyTorch's
        ``generate`` blocks, one batch at a time, so its batches never overlap."""
        return row.get("steady_images_per_second") or row["images_per_second"]

    def best(framework: str, variants: tuple[str, ...] | None = None) -> dict[str, Any] | None:
        """The fastest row of ``framework`` among ``variants`` (None: any variant)."""
        found = [row for row in rows if row["framework"] == framework
                 and (variants is None or row["variant"] in variants)]
        return max(found, key=rate, default=None)

    ours_bf16 = best("ours", ("bfloat16",))
    ours_f32 = best("ours", ("float32",))
    # Any PyTorch configuration: on a CPU without bfloat16 units its float32 is the fastest
    # (docs/results/history.md, "CPU rows of the accelerator benchmark").
    torch_fast = best("pytorch")
    torch_f32 = best("pytorch", ("float32",))
    parity_rows = [row for row in report["parts"]["parity"]["rows"]  # the library's own forms
                   if not row["setting"].endswith("attention")]
    skipped = [skip["what"] for name in ("parity", "throughput")
               for skip in report["parts"][name].get("skipped", [])]

    def decided(met: bool | None, prefix: str) -> bool | str | None:
        """``met``, unless the budget skipped rows whose name starts with ``prefix``: a ratio
        to the fastest PyTorch, or a mismatch count, holds only over all of them (a skipped
        row may be the fastest: docs/results/history.md, "Runs 5 and 6")."""
        cut = [what for what in skipped if what.startswith(prefix)]
        return f"undecided: {len(cut)} {prefix} rows skipped" if cut and met else met

    pipelines = {(row["decode"], row["workers"]): row
                 for row in report["parts"]["end_to_end"]["pipelines"]}
    resize_checks = report["parts"]["end_to_end"].get("device_resize_pixels", [])
    compiles = [row["compile_seconds"] for row in rows  # the library's own choices only
                if row["framework"] == "ours" and row["variant"] in ("float32", "bfloat16")
                and row.get("compile_seconds") is not None]

    def ratio(a: dict | None, b: dict | None) -> float | None:
        return rate(a) / rate(b) if a and b else None

    def ips(row: dict | None) -> float | None:
        return row["images_per_second"] if row else None

    fast_ratio, exact_ratio = ratio(ours_bf16, torch_fast), ratio(ours_f32, torch_f32)
    checks = [
        ("bfloat16 images/s, best batch", ">= 4000", None if ours_bf16 is None
         else rate(ours_bf16), None if ours_bf16 is None else rate(ours_bf16) >= 4000),
        ("bfloat16 vs fastest PyTorch", ">= 5x", fast_ratio,
         decided(None if fast_ratio is None else fast_ratio >= 5, "pytorch")),
        ("exact float32 caption mismatches vs PyTorch", "0",
         sum(row["mismatched"] for row in parity_rows) if parity_rows else None,
         decided(None if not parity_rows
                 else sum(row["mismatched"] for row in parity_rows) == 0, "parity")),
        ("exact float32 vs PyTorch float32 eager, best batches", ">= 3x", exact_ratio,
         decided(None if exact_ratio is None else exact_ratio >= 3, "pytorch float32")),
        # Issue 30's target for exact pixels resized on the device: 3,000; the others 2,000.
        *[(f"end to end images/s from JPEG files, {decode} decode on {workers}",
           f">= {wanted}", ips(pipelines.get((decode, workers))),
           None if (decode, workers) not in pipelines
           else ips(pipelines[decode, workers]) >= wanted)
          for decode, workers in PIPELINES
          for wanted in [3000 if decode.startswith("device-resize") else 2000]],
        ("device resize: float32 pixels equal to the host's", "bit-identical",
         None if not resize_checks else sum(row["values_differing"] for row in resize_checks),
         None if not resize_checks else all(row["bit_identical"] for row in resize_checks)),
        ("compile seconds per batch bucket, worst", "< 30", max(compiles, default=None),
         None if not compiles else max(compiles) < 30),
    ]
    return [{"target": name, "wanted": wanted, "measured": measured, "met": met}
            for name, wanted, measured, met in checks]


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table; None as "-", booleans as yes/no, floats to two decimals (whole
    numbers from 100 up)."""
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
        return str(value).replace("|", "/").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: the targets, then one section per part."""
    parts = report["parts"]
    env = parts["environment"]
    out = [f"# Accelerator benchmark ({report['profile']}, {env['date_utc']} UTC)", "",
           f"{report['settings']['model']}; {NUM_BEAMS} beams, max_length {MAX_LENGTH}; "
           f"wall {report['wall_seconds']:.0f} s (setup {report['setup_seconds']:.0f} s).", "",
           "## Targets (issue 10)", "",
           markdown_table(["target", "wanted", "measured", "met"],
                          [[t["target"], t["wanted"], t["measured"], t["met"]]
                           for t in report["targets"]]), "",
           "## 1. Environment", ""]
    keys = ["gpus", "cuda_driver_api", "jax_backend", "jax_devices", "torch_device", "cpu",
            "host_cores", "host_memory_gib", "python"]
    env_rows = [[key, ", ".join(map(str, env[key])) if isinstance(env[key], list) else env[key]]
                for key in keys if key in env]
    env_rows += [[name, version] for name, version in env.get("packages", {}).items()]
    out += [markdown_table(["what", "value"], env_rows), ""]

    out += [f"## 2. Parity: exact mode vs PyTorch float32, TF32 off ({parts['parity']['status']})",
            ""]
    out += [markdown_table(["model", "setting", "captions", "mismatched", "seconds"],
                           [[r["model"], r["setting"], r["captions"], r["mismatched"],
                             r["seconds"]] for r in parts["parity"].get("rows", [])]), ""]

    out += [f"## 3. Generator throughput ({parts['throughput']['status']})", "",
            "images/s from host pixel values to host tokens, one batch at a time (median of "
            "timed batches); streamed: ours over consecutive batches dispatched one ahead, as "
            "`caption` runs them, from the first dispatch; steady: the same run from its first "
            "result to its last, a long job's rate (the targets read it where measured); "
            "compile s: ahead-of-time "
            "lowering + compilation, apart from the first call; peak: device memory high-water "
            "(JAX: process-wide, its own only where 'own peak' is yes).", ""]
    out += [markdown_table(
        ["framework", "variant", "batch", "images/s", "streamed images/s", "steady images/s",
         "compile s", "first call s", "peak GiB", "own peak", "note"],
        [[r["framework"], r["variant"], r["batch"], r.get("images_per_second"),
          r.get("streamed_images_per_second"), r.get("steady_images_per_second"),
          r.get("compile_seconds"), r.get("first_call_seconds"), r.get("peak_gib"),
          r.get("peak_attributable"),
          r.get("error") or ", ".join(filter(None, (r.get("attention"), r.get("timed"))))]
         for r in parts["throughput"].get("rows", [])]), ""]

    profiles = parts["throughput"].get("profiles", [])
    if profiles:
        out += ["### Device profile of one batch (jax.profiler)", "",
                "Kernels and copies on the device's streams during one call: busy = time any "
                "of them ran; busy share = busy / span from the first to the last; well below "
                "1, the device waited for the host. Compute starts: the first kernel, from the "
                "span's start. Host: how long the jitted call held the caller, the longest "
                "input copy into staging memory and the program's setup (CUDA graphs).", "",
                markdown_table(["variant", "batch", "call s", "device", "kernels",
                                "kernels per step", "span ms", "busy ms", "busy share",
                                "compute starts ms", "call held host ms", "input copy ms",
                                "setup ms", "top kernels (ms)"],
                               [[r["variant"], r["batch"], r["call_seconds"], d["device"],
                                 d["kernels"], d["kernels"] / r["steps"], d["span_ms"],
                                 d["busy_ms"], d["busy_share"], d.get("compute_start_ms"),
                                 *[r.get("host", {}).get(phase) for phase in HOST_PHASES],
                                 ", ".join(f"{k['name'][:40]} {k['total_ms']:.1f}"
                                           for k in d["top_kernels"][:5])]
                                for r in profiles for d in r["devices"]]
                               + [[r["variant"], r["batch"], r["call_seconds"],
                                   r.get("error", "no device kernels in the trace"),
                                   *[None] * 10]
                                  for r in profiles if not r["devices"]]), ""]

    e2e = parts["end_to_end"]
    out += [f"## 4. End to end from JPEG files ({e2e['status']})", ""]
    if e2e.get("pipelines"):
        out += ["Decode capacity: images/s all decode threads together could give (images x "
                "threads / decode seconds); device rate: images / seconds the loop spent "
                "dispatching to and waiting on the device (time the device overlaps other work "
                "is not counted, so this is an upper bound); the smaller bounds the run. Rows "
                "s: the loop's own time (detokenize, build and write rows), while the next "
                "batch runs on the device. Caller CPU: this process's CPU per image, all its "
                "threads (not the decode processes'). Host CPU: every process's, per image; "
                "cores busy: the host's CPU seconds per second of the run.", "",
                markdown_table(
                    ["decode", "on", "images", "batch", "dtype", "images/s", "wall s",
                     "device waited for input s", "rows s", "decode threads",
                     "decode capacity img/s", "device img/s", "bound",
                     "caller CPU ms/image", "host CPU ms/image", "host cores busy"],
                    [[r["decode"], r["workers"], r["images"], r["batch"], r["dtype"],
                      r["images_per_second"],
                      r["wall_seconds"], r["input_wait_seconds"], r.get("rows_seconds"),
                      r["decode_threads"], r["decode_capacity_images_per_second"],
                      r["device_images_per_second"], r["bound"],
                      r.get("caller_cpu_ms_per_image"), r.get("host_cpu_ms_per_image"),
                      r.get("host_cores_busy")] for r in e2e["pipelines"]]),
                ""]
    for check in e2e.get("device_resize_pixels", []):
        out += [f"Device resize on {check['platform']}: {check['images']} JPEGs in "
                f"{check['canvas_side']}-pixel canvases, float32 pixels "
                + ("bit-identical to the host's." if check["bit_identical"] else
                   f"differing from the host's in {check['values_differing']} values."), ""]
    scaling = e2e.get("decode_scaling", [])
    if scaling:
        single = {(row["mode"], row["decode"]): row["images_per_second"] for row in scaling
                  if row["workers"] == 1}
        out += ["### Host decode scaling (PIL decode, + resize + normalise but for decode-only)",
                "",
                "Mode feed: the captioning feed alone on decode processes (no device), timed "
                "from its first batch; start s: starting its processes and decoding that "
                "batch.", "",
                markdown_table(["decode", "mode", "workers", "images", "images/s",
                                "x one worker", "host CPU ms/image", "host cores busy",
                                "start s"],
                               [[r["decode"], r["mode"], r["workers"], r["images"],
                                 r["images_per_second"],
                                 r["images_per_second"] / single[r["mode"], r["decode"]]
                                 if single.get((r["mode"], r["decode"])) else None,
                                 r.get("host_cpu_ms_per_image"), r.get("host_cores_busy"),
                                 r.get("start_seconds")]
                                for r in scaling]), ""]

    notes = []
    for name in ("parity", "throughput", "end_to_end"):
        for skip in parts[name].get("skipped", []):
            notes.append(f"- skipped {skip['what']}: {skip['why']}")
        for error in parts[name].get("errors", []):
            notes.append(f"- error in {name}: {error['message']}")
    if notes:
        out += ["## Skipped and errors", ""] + notes + [""]
    return "\n".join(out)


def write_report(out: Path, report: dict[str, Any]) -> str:
    """Writes the JSON and Markdown reports into ``out``; returns the Markdown."""
    markdown = render_markdown(report)
    (out / f"{RESULT_NAME}.json").write_text(json.dumps(report, indent=2, default=jsonable))
    (out / f"{RESULT_NAME}.md").write_text(markdown + "\n")
    return markdown
