"""The accelerator benchmark (``python -m scripts.accelerator``): one ``--smoke`` run end to
end (every part measured, JSON and Markdown), plus its trace reading, budget handling and
targets on made-up inputs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flax_captioner.testing import CHAOTIC_SEEDS
from scripts import common
from scripts.accelerator import plan, report, run, traces, workers

REPO = Path(__file__).resolve().parent.parent


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

    activity = traces.device_activity(tmp_path / "trace")
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
    assert traces.device_activity(tmp_path / "empty")["devices"] == []


def test_a_slow_first_call_stands_in_for_timed_batches_and_a_cut_names_its_row(tmp_path):
    results = tmp_path / "worker.jsonl"
    recorder = workers.Recorder(results, deadline=time.time() + 100)
    calls = []
    first, repeats = workers.timed_repeats(lambda: calls.append("fast"), 3, recorder, "fast row")
    assert calls == ["fast"] * 4 and len(repeats) == 3
    # A first call that takes most of what is left: its timed batches do not fit, none run.
    recorder.deadline = time.time() + 1.0
    first, repeats = workers.timed_repeats(lambda: (calls.append("slow"), time.sleep(0.6)), 3,
                                          recorder, "slow row")
    assert calls[4:] == ["slow"] and repeats == [] and first >= 0.6
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert lines[-1]["kind"] == "skipped" and lines[-1]["what"] == "slow row, timed batches"
    assert run.cut_short(lines, recorder.deadline) == ""  # nothing was running
    # A row that starts and is still running when the budget ends (its worker is killed).
    assert recorder.fits("long row", 0.0)
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert run.cut_short(lines, lines[-1]["at"] + 40) == \
        "; long row had run 40 s without finishing"


def test_the_bfloat16_target_reads_our_steady_rate_against_the_fastest_pytorch():
    rows = [{"framework": "pytorch", "variant": "float32", "batch": 8, "images_per_second": 0.8},
            {"framework": "pytorch", "variant": "bfloat16-autocast", "batch": 8,
             "images_per_second": 0.02},  # as on a CPU without bfloat16 units
            {"framework": "ours", "variant": "bfloat16", "batch": 8, "images_per_second": 1.2,
             "streamed_images_per_second": 1.4,  # with the first batch's start-up
             "steady_images_per_second": 1.6},  # what a long job gets: the targets' rate
            {"framework": "ours", "variant": "bfloat16 einsum", "batch": 8,
             "images_per_second": 9.0}]  # a switched variant: not the library's
    made_up = {"parts": {"throughput": {"rows": rows}, "parity": {"rows": []},
                         "end_to_end": {"pipelines": []}}}
    targets = {target["target"]: target for target in report.targets(made_up)}
    assert targets["bfloat16 vs fastest PyTorch"]["measured"] == pytest.approx(2.0)
    assert targets["bfloat16 vs fastest PyTorch"]["met"] is False
    assert targets["bfloat16 images/s, best batch"]["measured"] == 1.6
    # A ratio the budget cut short is undecided: PyTorch's fastest row may be the skipped one.
    def against_fastest_pytorch() -> dict:
        return {target["target"]: target for target in report.targets(made_up)}[
            "bfloat16 vs fastest PyTorch"]

    rows[2]["steady_images_per_second"] = 5.0
    assert against_fastest_pytorch()["met"] is True
    made_up["parts"]["throughput"]["skipped"] = [{"what": "pytorch float32 batch 64"}]
    assert against_fastest_pytorch()["met"] == "undecided: 1 pytorch rows skipped"


def test_the_cpu_is_named_with_its_family_model_and_bfloat16_units():
    cpuinfo = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
               "model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert common.cpu_model(cpuinfo) == \
        "AMD EPYC (family 25 model 17; bfloat16 units: avx512_bf16)"
    assert common.cpu_model(cpuinfo.replace(" avx512_bf16", "")).endswith("units: none)")




def test_the_plan_measures_the_targets_rows_first_and_every_variant_once():
    """A short budget drops the plan's last rows: the rows the targets read come first, a
    profiled batch comes after the row that compiled its program, and every variant is
    planned, each row once."""
    variants = plan.throughput_variants("gpu", gpu=True)
    batches = (64, 256, 1024)
    rows = plan.throughput_plan(variants, batches, 64)
    middle = batches[len(batches) // 2]
    targets_read = {("ours", dtype, batch) for dtype in ("bfloat16", "float32")
                    for batch in batches if batch >= middle}
    assert set(rows[:len(targets_read)]) == targets_read
    for index, (framework, variant, batch) in enumerate(rows):
        if framework == "profile":
            assert ("ours", variant, batch) in rows[:index]
    assert {variant for framework, variant, _ in rows if framework == "ours"} == set(variants)
    assert {framework for framework, _, _ in rows} == {"ours", "profile", "hf-flax"}
    assert len(rows) == len(set(rows))


def test_variants_switch_one_kernel_choice_each_and_their_xla_options_compile(tiny_checkpoint):
    import numpy as np

    from flax_captioner import loading
    from flax_captioner.settings import GenerationSettings

    gpu, cpu = plan.throughput_variants("gpu", gpu=True), plan.throughput_variants("cpu", False)
    for variants in (gpu, cpu):
        assert variants["float32"] == variants["bfloat16"] == {}  # the library's own choices
        for name, choices in variants.items():
            assert name.split()[0] in ("float32", "bfloat16") and len(choices) <= 1
            assert bool(choices) == (" " in name)
    # cuDNN's kernels and the GPU matmul backends only where there is a GPU.
    assert not any({"compiler_options", "encoder_attention"} & set(choices)
                   or "cudnn" in choices.values() for choices in cpu.values())
    assert any("compiler_options" in choices for choices in gpu.values())
    # XLA rejects an option name or value it does not know, on any backend: these it knows.
    model = loading.load_checkpoint(tiny_checkpoint)
    settings = GenerationSettings.resolve(loading.generation_defaults(model.config),
                                          max_length=4)
    for name, choices in gpu.items():
        if "compiler_options" in choices or "self_attention" in choices:
            generator = common.make_generator(model.params, model.config, choices)
            assert generator.generate(np.zeros((1, 3, 32, 32), np.float32),
                                      settings).sequences.shape == (1, 4), name


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
        [sys.executable, "-m", "scripts.accelerator", "--smoke", "--out", str(tmp_path),
         "--budget-scale", "6"], capture_output=True, text=True, timeout=1500, cwd=REPO)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads((tmp_path / "accelerator-benchmark.json").read_text())
    markdown = (tmp_path / "accelerator-benchmark.md").read_text()
    assert completed.stdout.strip().endswith(markdown.strip())  # the tables print last
    profile = plan.PROFILES["smoke"]
    parts = result["parts"]
    assert set(parts) == set(plan.PARTS)
    for name in ("parity", "throughput", "end_to_end"):  # every worker ran to its end
        assert parts[name]["status"].count(": ok") == len(parts[name]["status"].split("; "))
        assert parts[name]["skipped"] == [] and parts[name]["errors"] == []
    env = parts["environment"]
    assert env["jax_backend"] == "cpu" and env["packages"]["jax"] and env["host_cores"] >= 1

    # Parity: every model and setting, and the chaotic checkpoints' beam search with the
    # other kernel forms, all captions equal to PyTorch's.
    parity = {(row["model"], row["setting"]): row for row in parts["parity"]["rows"]}
    chaotic = {f"chaotic-{seed}" for seed in CHAOTIC_SEEDS}
    settings = {setting for setting, _ in plan.parity_settings(plan.MAX_LENGTH)}
    assert {model for model, _ in parity} == chaotic | {"tiny random"}
    for model in chaotic | {"tiny random"}:
        assert settings <= {setting for name, setting in parity if name == model}
    assert {setting for model, setting in parity if model in chaotic} == settings | {
        f"beam, {form}" for form in plan.parity_other_forms("cpu")}
    assert all(row["captions"] == profile.parity_images and row["mismatched"] == 0
               for row in parity.values())

    # Throughput: every planned row and every PyTorch variant measured.
    rows = {(row["framework"], row["variant"], row["batch"]): row
            for row in parts["throughput"]["rows"]}
    planned = plan.throughput_plan(plan.throughput_variants("cpu", gpu=False),
                                   profile.batches, profile.hf_flax_batch)
    assert set(rows) == {row for row in planned if row[0] != "profile"} | {
        ("pytorch", variant, batch) for variant in profile.torch_variants
        for batch in profile.batches}
    for (framework, _, _), row in rows.items():
        assert row["images_per_second"] > 0 and len(row["batch_seconds"]) == profile.repeats
        # Ours also over consecutive batches dispatched one ahead (as `caption` runs them),
        # from the first dispatch and from the first result.
        for rate in ("streamed_images_per_second", "steady_images_per_second"):
            assert (row[rate] > 0 if framework == "ours" else row.get(rate) is None)
    assert rows["ours", "float32", profile.batches[0]]["compile_seconds"] > 0
    # The profiled batches; XLA:CPU's trace has no device plane. Kept for XProf.
    profiles = parts["throughput"]["profiles"]
    assert {(row["variant"], row["batch"]) for row in profiles} == {
        (variant, batch) for framework, variant, batch in planned if framework == "profile"}
    for profiled in profiles:
        assert profiled["devices"] == [] and profiled["call_seconds"] > 0
        assert profiled["steps"] == plan.MAX_LENGTH - 1
        assert (tmp_path / "traces" / f"{profiled['variant']}-{profiled['batch']}.xplane.pb"
                ).is_file()

    # End to end: the four ways of decoding (resizing on the host or the device), every image
    # captioned, the same captions with the host's or the device's resize.
    pipelines = {(row["decode"], row["workers"]): row
                 for row in parts["end_to_end"]["pipelines"]}
    assert set(pipelines) == set(plan.PIPELINES) == {
        ("exact", "threads"), ("exact", "processes"), ("device-resize", "processes"),
        ("device-resize-nvimagecodec", "processes"), ("fast", "processes")}
    for pipeline in pipelines.values():
        assert pipeline["images"] == pipeline["captioned"] == profile.e2e_images
        assert pipeline["errors"] == 0 and pipeline["input_wait_seconds"] >= 0
        assert 0 <= pipeline["rows_seconds"] < pipeline["wall_seconds"]
        assert pipeline["images_per_second"] > 0 and pipeline["bound"] in ("decode", "device")
        assert pipeline["caller_cpu_ms_per_image"] > 0  # the feed's own cost, on this host
        # The whole host's (decode processes included): at least the caller's.
        assert pipeline["host_cpu_ms_per_image"] >= pipeline["caller_cpu_ms_per_image"] / 2
        assert pipeline["host_cores_busy"] > 0
    scaling = {(row["decode"], row["mode"], row["workers"]): row
               for row in parts["end_to_end"]["decode_scaling"]}
    assert set(scaling) == {(decode, mode, workers) for decode, mode in (
        ("exact", "threads"), ("exact", "processes"), ("decode-only", "processes"),
        ("decode-only-nvimagecodec", "processes"), ("fast", "threads"))
        for workers in profile.decode_workers} | {
        (decode, "feed", profile.decode_workers[-1]) for decode in ("exact", "decode-only")}
    for row in scaling.values():
        assert row["images_per_second"] > 0 and row["host_cpu_ms_per_image"] >= 0
    # The feed alone: every image after its first batch timed, its start-up apart.
    for decode in ("exact", "decode-only"):
        feed_row = scaling[decode, "feed", profile.decode_workers[-1]]
        assert feed_row["images"] == profile.e2e_images and feed_row["start_seconds"] > 0
    [pixels] = parts["end_to_end"]["device_resize_pixels"]
    assert pixels["bit_identical"] is True and pixels["values_differing"] == 0
    assert pixels["images"] == profile.e2e_batch and pixels["platform"] == "cpu"

    # The targets are read from the rows.
    targets = {target["target"]: target for target in result["targets"]}
    assert targets["exact float32 caption mismatches vs PyTorch"]["measured"] == 0
    assert targets["exact float32 caption mismatches vs PyTorch"]["met"] is True
    ours_bf16 = max(row["steady_images_per_second"] for key, row in rows.items()
                    if key[:2] == ("ours", "bfloat16"))
    fastest_torch = max(row["images_per_second"] for key, row in rows.items()
                        if key[0] == "pytorch")
    assert targets["bfloat16 images/s, best batch"]["measured"] == pytest.approx(ours_bf16)
    assert targets["bfloat16 vs fastest PyTorch"]["measured"] == pytest.approx(
        ours_bf16 / fastest_torch)
    assert targets["end to end images/s from JPEG files, fast decode on processes"][
        "measured"] == pytest.approx(pipelines["fast", "processes"]["images_per_second"])

    # Every table renders: a header, a separator, and rows with the header's cell count.
    for table in table_blocks(markdown):
        cells = table[0].count("|")
        assert table[1] == "|" + "---|" * (cells - 1)
        assert len(table) >= 3 and all(line.count("|") == cells for line in table)
    for heading in ("## Targets (issue 10)", "## 1. Environment", "## 2. Parity",
                    "## 3. Generator throughput", "### Device profile of one batch",
                    "## 4. End to end from JPEG files", "### Host decode scaling"):
        assert heading in markdown
