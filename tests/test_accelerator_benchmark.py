"""scripts/accelerator_benchmark.py --smoke end to end: every part measured, JSON and Markdown."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "accelerator_benchmark.py"


def benchmark_module():
    spec = importlib.util.spec_from_file_location("accelerator_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def xspace_event(metadata_id: int, start_ms: float, end_ms: float) -> str:
    return (f"events {{ metadata_id: {metadata_id} offset_ps: {int(start_ms * 1e9)} "
            f"duration_ps: {int((end_ms - start_ms) * 1e9)} }}")


def test_device_activity_counts_stream_kernels_once_each_and_their_busy_share(tmp_path):
    from jax.profiler import ProfileData

    # A GPU plane as XLA:GPU's profiler writes it: kernels on "Stream" lines (two overlap,
    # one copy on another stream), plus derived lines ("XLA Ops") to ignore; a host plane
    # with the jitted call and its input copy (HOST_PHASES) and other work to ignore.
    kernels = " ".join([xspace_event(1, 0, 5), xspace_event(2, 3, 8), xspace_event(1, 10, 11)])
    host_events = " ".join([xspace_event(3, 0, 50), xspace_event(5, 1, 3),
                            xspace_event(5, 4, 5), xspace_event(6, 0, 60)])
    text = f"""
      planes {{ name: "/host:CPU" lines {{ name: "python" {host_events} }}
                event_metadata {{ key: 3 value {{ id: 3 name: "PjitFunction(<lambda>)" }} }}
                event_metadata {{ key: 5 value {{ id: 5 name: "H2D Dispatch" }} }}
                event_metadata {{ key: 6 value {{ id: 6 name: "host work" }} }} }}
      planes {{ name: "/device:GPU:0"
        lines {{ name: "Stream #13(Compute)" timestamp_ns: 1000000 {kernels} }}
        lines {{ name: "Stream #14(MemcpyH2D)" timestamp_ns: 1000000 {xspace_event(4, 12, 13)} }}
        lines {{ name: "XLA Ops" timestamp_ns: 1000000 {xspace_event(1, 0, 40)} }}
        event_metadata {{ key: 1 value {{ id: 1 name: "loop_fusion" }} }}
        event_metadata {{ key: 2 value {{ id: 2 name: "gemm" }} }}
        event_metadata {{ key: 4 value {{ id: 4 name: "MemcpyH2D" }} }} }}
    """
    trace = tmp_path / "trace" / "plugins" / "profile" / "run"
    trace.mkdir(parents=True)
    (trace / "host.xplane.pb").write_bytes(ProfileData.text_proto_to_serialized_xspace(text))

    activity = benchmark_module().device_activity(tmp_path / "trace")
    [device] = activity["devices"]
    assert device["device"] == "/device:GPU:0" and device["kernels"] == 4
    assert device["span_ms"] == pytest.approx(13)
    assert device["busy_ms"] == pytest.approx(10)  # 0-8 (overlap once), 10-11, 12-13
    assert device["busy_share"] == pytest.approx(10 / 13)
    assert device["compute_start_ms"] == pytest.approx(0)  # the first kernel is no copy
    assert activity["host"] == {"jitted_call_ms": pytest.approx(50),
                                "input_copy_ms": pytest.approx(2),  # the longest of two
                                "program_setup_ms": None}
    assert [(k["name"], k["count"], k["total_ms"]) for k in device["top_kernels"]] == [
        ("loop_fusion", 2, pytest.approx(6)), ("gemm", 1, pytest.approx(5)),
        ("MemcpyH2D", 1, pytest.approx(1))]
    assert benchmark_module().device_activity(tmp_path / "empty")["devices"] == []


def test_a_slow_first_call_stands_in_for_timed_batches_and_a_cut_names_its_row(tmp_path):
    module = benchmark_module()
    results = tmp_path / "worker.jsonl"
    recorder = module.Recorder(results, deadline=time.time() + 100)
    calls = []
    first, repeats = module.timed_repeats(lambda: calls.append("fast"), 3, recorder, "fast row")
    assert calls == ["fast"] * 4 and len(repeats) == 3
    # A first call that takes most of what is left: its timed batches do not fit, none run.
    recorder.deadline = time.time() + 1.0
    first, repeats = module.timed_repeats(lambda: (calls.append("slow"), time.sleep(0.6)), 3,
                                          recorder, "slow row")
    assert calls[4:] == ["slow"] and repeats == [] and first >= 0.6
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert lines[-1]["kind"] == "skipped" and lines[-1]["what"] == "slow row, timed batches"
    assert module.cut_short(lines, recorder.deadline) == ""  # nothing was running
    # A row that starts and is still running when the budget ends (its worker is killed).
    assert recorder.fits("long row", 0.0)
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert module.cut_short(lines, lines[-1]["at"] + 40) == \
        "; long row had run 40 s without finishing"


def test_the_bfloat16_target_reads_our_steady_rate_against_the_fastest_pytorch():
    module = benchmark_module()
    rows = [{"framework": "pytorch", "variant": "float32", "batch": 8, "images_per_second": 0.8},
            {"framework": "pytorch", "variant": "bfloat16-autocast", "batch": 8,
             "images_per_second": 0.02},  # as on a CPU without bfloat16 units
            {"framework": "ours", "variant": "bfloat16", "batch": 8, "images_per_second": 1.2,
             "streamed_images_per_second": 1.4,  # with the first batch's start-up
             "steady_images_per_second": 1.6},  # what a long job gets: the targets' rate
            {"framework": "ours", "variant": "bfloat16 einsum", "batch": 8,
             "images_per_second": 9.0}]  # a switched variant: not the library's
    report = {"parts": {"throughput": {"rows": rows}, "parity": {"rows": []},
                        "end_to_end": {"pipelines": []}}}
    targets = {target["target"]: target for target in module.targets(report)}
    assert targets["bfloat16 vs fastest PyTorch"]["measured"] == pytest.approx(2.0)
    assert targets["bfloat16 vs fastest PyTorch"]["met"] is False
    assert targets["bfloat16 images/s, best batch"]["measured"] == 1.6
    # A ratio the budget cut short is undecided: PyTorch's fastest row may be the skipped one.
    rows[2]["steady_images_per_second"] = 5.0
    assert module.targets(report)[1]["met"] is True
    report["parts"]["throughput"]["skipped"] = [{"what": "pytorch float32 batch 64"}]
    assert module.targets(report)[1]["met"] == "undecided: 1 pytorch rows skipped"


def test_the_cpu_is_named_with_its_family_model_and_bfloat16_units():
    module = benchmark_module()
    cpuinfo = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
               "model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert module.cpu_model(cpuinfo) == \
        "AMD EPYC (family 25 model 17; bfloat16 units: avx512_bf16)"
    assert module.cpu_model(cpuinfo.replace(" avx512_bf16", "")).endswith("units: none)")


def table_blocks(markdown: str) -> list[list[str]]:
    """Consecutive lines starting with '|', one list per table."""
    blocks, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    return blocks


@pytest.mark.slow  # about a minute on an idle 2-core CPU: four worker processes, a few compiles
def test_smoke_run_measures_every_part_and_renders_markdown(tmp_path):
    # Budgets scaled up so a loaded CI machine skips nothing; the smoke sizes stay tiny.
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path), "--budget-scale", "6"],
        capture_output=True, text=True, timeout=1500)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((tmp_path / "accelerator-benchmark.json").read_text())
    markdown = (tmp_path / "accelerator-benchmark.md").read_text()
    assert completed.stdout.strip().endswith(markdown.strip())  # the tables print last
    parts = report["parts"]
    assert set(parts) == {"environment", "parity", "throughput", "end_to_end"}
    for name in ("parity", "throughput", "end_to_end"):
        assert parts[name]["status"].count(": ok") == len(parts[name]["status"].split("; "))
        assert parts[name]["skipped"] == [] and parts[name]["errors"] == []

    env = parts["environment"]
    assert env["jax_backend"] == "cpu" and env["packages"]["jax"] and env["host_cores"] >= 1

    # Parity: three chaotic checkpoints and the tiny random model, four settings each (and
    # the chaotic ones' beam search with the other cross- and self-attention forms), 0 off.
    parity = {(row["model"], row["setting"]): row for row in parts["parity"]["rows"]}
    chaotic = [f"chaotic-{seed}" for seed in benchmark_module().CHAOTIC_SEEDS]
    assert set(parity) == {(model, setting) for model in [*chaotic, "tiny random"]
                           for setting in ("beam", "greedy", "min_length", "no_repeat_ngram")
                           } | {(model, f"beam, {form}") for model in chaotic
                                for form in ("einsum cross-attention",
                                             "multiply_reduce self-attention")}
    assert all(row["captions"] == 4 and row["mismatched"] == 0 for row in parity.values())

    rows = {(row["framework"], row["variant"], row["batch"]): row
            for row in parts["throughput"]["rows"]}
    # The library's choices, then each with one choice of backend.py switched (on CPU: the
    # einsum cross-attention and the fixed-steps loop).
    assert set(rows) == {("ours", "float32", 2), ("ours", "bfloat16", 2),
                         ("ours", "float32 einsum", 2), ("ours", "bfloat16 einsum", 2),
                         ("ours", "float32 fixed_steps", 2), ("ours", "bfloat16 fixed_steps", 2),
                         ("hf-flax", "float32", 2), ("pytorch", "float32", 2),
                         ("pytorch", "bfloat16-autocast", 2)}
    for (framework, _, _), row in rows.items():
        assert row["images_per_second"] > 0 and len(row["batch_seconds"]) == 2
        # Ours also over consecutive batches dispatched one ahead (as `caption` runs them),
        # from the first dispatch and from the first result.
        for rate in ("streamed_images_per_second", "steady_images_per_second"):
            assert (row[rate] > 0 if framework == "ours" else row.get(rate) is None)
    assert rows["ours", "float32", 2]["compile_seconds"] > 0
    # A profiled batch of the library's bfloat16 and float32; XLA:CPU's trace has no device
    # plane.
    profiles = {row["variant"]: row for row in parts["throughput"]["profiles"]}
    assert set(profiles) == {"bfloat16", "float32"}
    for dtype, profiled in profiles.items():
        assert profiled["devices"] == [] and profiled["batch"] == 2
        assert profiled["call_seconds"] > 0 and profiled["steps"] == 15
        assert list((tmp_path / "traces").glob(f"{dtype}-2.xplane.pb"))  # kept for XProf

    pipelines = {(row["decode"], row["workers"]): row
                 for row in parts["end_to_end"]["pipelines"]}
    assert set(pipelines) == {("exact", "threads"), ("exact", "processes"),
                              ("fast", "processes")}
    for pipeline in pipelines.values():
        assert pipeline["images"] == 32 and pipeline["captioned"] == 32
        assert pipeline["errors"] == 0 and pipeline["input_wait_seconds"] >= 0
        assert 0 <= pipeline["rows_seconds"] < pipeline["wall_seconds"]
        assert pipeline["images_per_second"] > 0 and pipeline["bound"] in ("decode", "device")
        assert pipeline["caller_cpu_ms_per_image"] > 0  # the feed's own cost, on this host
    scaling = {(row["decode"], row["mode"], row["workers"])
               for row in parts["end_to_end"]["decode_scaling"]}
    assert scaling == {(decode, mode, workers) for decode, mode in (
        ("exact", "threads"), ("exact", "processes"), ("fast", "threads")) for workers in (1, 2)}

    targets = {target["target"]: target for target in report["targets"]}
    assert targets["exact float32 caption mismatches vs PyTorch"]["measured"] == 0
    assert targets["exact float32 caption mismatches vs PyTorch"]["met"] is True

    # Every table renders: a header, a separator, and rows with the header's cell count.
    tables = table_blocks(markdown)
    assert len(tables) == 7  # targets, environment, parity, throughput, profile, pipeline,
    #                          decode
    for table in tables:
        cells = table[0].count("|")
        assert table[1] == "|" + "---|" * (cells - 1)
        assert len(table) >= 3 and all(line.count("|") == cells for line in table)
    for heading in ("## Targets (issue 10)", "## 1. Environment", "## 2. Parity",
                    "## 3. Generator throughput", "### Device profile of one batch",
                    "## 4. End to end from JPEG files",
                    "### Host decode scaling"):
        assert heading in markdown


def test_gpu_variants_switch_one_backend_choice_each_and_their_xla_options_parse(tiny_checkpoint):
    import numpy as np

    from flax_captioner import loading
    from flax_captioner.generator import GenerationSettings, Generator

    module = benchmark_module()
    variants = module.throughput_variants("gpu", gpu=True)
    assert variants == {
        "bfloat16 multiply_reduce-self": {"self_attention": "multiply_reduce"},
        "bfloat16 einsum-encoder": {"encoder_attention": "einsum"},
        "bfloat16 cudnn-cross": {"cross_context": "cudnn"},
        "float32": {}, "bfloat16": {},
        "float32 until_done": {"search_loop": "until_done"},
        "bfloat16 until_done": {"search_loop": "until_done"},
        "float32 multiply_reduce": {"cross_context": "multiply_reduce"},
        "bfloat16 multiply_reduce": {"cross_context": "multiply_reduce"},
        "float32 triton": {"compiler_options": {}},
        "bfloat16 cublas": {"compiler_options": {"xla_gpu_enable_triton_gemm": False}}}
    cpu_variants = " ".join(module.throughput_variants("cpu", gpu=False))
    assert not {"triton", "cublas", "einsum-encoder", "cudnn-cross",
                "multiply_reduce-self"} & set(cpu_variants.split())
    # XLA rejects an option name or value it does not know, on any backend: these it knows.
    model = loading.load_checkpoint(tiny_checkpoint).model
    settings = GenerationSettings.resolve(loading.generation_defaults(model.config),
                                          max_length=4)
    for variant in ("bfloat16 cublas", "float32 triton", "bfloat16 multiply_reduce-self"):
        generator = Generator(model.params, model.config, **variants[variant])
        assert generator.generate(np.zeros((1, 3, 32, 32), np.float32),
                                  settings).sequences.shape == (1, 4)


def test_gpu_plan_puts_the_targets_rows_first_and_the_long_compiles_last():
    module = benchmark_module()
    plan = module.throughput_plan(module.throughput_variants("gpu", gpu=True), (64, 256, 1024),
                                  64)
    assert plan == [("ours", "bfloat16", 256), ("ours", "bfloat16", 1024),
                    ("ours", "float32", 256), ("ours", "float32", 1024),
                    ("profile", "bfloat16", 256), ("profile", "bfloat16", 1024),
                    ("profile", "float32", 256),
                    ("ours", "bfloat16 multiply_reduce-self", 256),
                    ("ours", "bfloat16 multiply_reduce-self", 1024),
                    ("ours", "bfloat16 einsum-encoder", 256),
                    ("ours", "bfloat16 einsum-encoder", 1024),
                    ("ours", "bfloat16 cudnn-cross", 256), ("ours", "bfloat16 cudnn-cross", 1024),
                    ("ours", "bfloat16 until_done", 256),
                    ("ours", "bfloat16 multiply_reduce", 256), ("ours", "bfloat16 cublas", 256),
                    ("ours", "bfloat16", 64), ("ours", "float32", 64),
                    ("ours", "float32 until_done", 256),
                    ("ours", "float32 multiply_reduce", 256),
                    ("ours", "float32 triton", 256), ("hf-flax", "float32", 64)]
