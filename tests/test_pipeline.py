"""The batch-captioning pipeline: every input kind, both output formats, resume after SIGKILL
and SIGTERM, torn lines, bad inputs, unwritable outputs, multi-process merging."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flax_captioner.captioner import decode_workers
from flax_captioner.errors import DataError, ModelLoadError, OutputError
from flax_captioner.options import CaptionOptions
from flax_captioner.pipeline import PipelineStats, run_pipeline
from flax_captioner.preflight import check_run
from flax_captioner.writers import merge_shards, part_path, read_rows, write_rows

BEAM_SETTINGS = {"num_beams": 2, "max_length": 6}


def write_image(path: Path, seed: int, size: tuple[int, int] = (20, 14)) -> Path:
    """A random-noise RGB image; the format follows the suffix."""
    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def image_bytes(seed: int, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.RandomState(seed).randint(0, 256, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar shard holding ``members`` (name, bytes) in order, like img2dataset's."""
    with tarfile.open(path, "w") as archive:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return path


def webdataset_members(seeds: list[int]) -> list[tuple[str, bytes]]:
    members = []
    for seed in seeds:
        key = f"{seed:09d}"
        members += [(f"{key}.jpg", image_bytes(seed)), (f"{key}.txt", b"a caption"),
                    (f"{key}.json", json.dumps({"key": key}).encode())]
    return members


def jsonl_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(captioner, inputs, output, settings=BEAM_SETTINGS, **options) -> PipelineStats:
    """``run_pipeline`` with ``settings`` and ``options`` (batches of 4, 2 decode threads)."""
    options = CaptionOptions(**{"batch_size": 4, "decode_threads": 2, **settings, **options})
    return run_pipeline([str(spec) for spec in inputs], None if output is None else str(output),
                        options, captioner)


@pytest.fixture()
def image_dir(tmp_path) -> Path:
    """13 images, nested, mixed formats and sizes, plus files that are not images."""
    root = tmp_path / "images"
    for seed in range(13):
        suffix = (".jpg", ".png", ".webp")[seed % 3]
        folder = root / ("b" if seed % 2 else "a") / ("deep" if seed % 5 == 0 else "")
        write_image(folder / f"img{seed:02d}{suffix}", seed, size=(16 + seed, 12 + 2 * seed))
    (root / "notes.txt").write_text("not an image")
    (root / "a" / "meta.json").write_text("{}")
    return root


def sorted_images(root: Path) -> list[str]:
    """What the pipeline must list for a directory: image files, depth first, sorted."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        found += [os.path.join(folder, name) for name in sorted(files)
                  if name.endswith((".jpg", ".png", ".webp"))]
    return found


def test_directory_rows_follow_input_order_and_match_direct_generation(captioner, image_dir,
                                                                       tmp_path):
    output = tmp_path / "out.jsonl"
    stats = run(captioner, [image_dir], output, batch_size=16)
    rows = jsonl_rows(output)
    expected_images = sorted_images(image_dir)
    assert [row["image"] for row in rows] == expected_images
    assert stats.captioned == 13 and stats.errors == 0 and stats.resumed == 0
    # One batch of 13 holds every image, so a direct call sees exactly the same batch.
    pixel_values = captioner.preprocess(expected_images)
    direct = captioner.generate(pixel_values, **BEAM_SETTINGS)
    per_image = len(direct.scores) // 13
    assert [row["caption"] for row in rows] == captioner.decode(direct.sequences[::per_image])
    np.testing.assert_allclose([row["score"] for row in rows],
                               np.asarray(direct.scores)[::per_image], rtol=1e-6)


def test_batches_refilling_released_memory_match_direct_generation(captioner, image_dir,
                                                                    tmp_path):
    # Batches of 2 over 13 images: the feed refills each released batch's memory with a later
    # batch, so memory handed out twice would show here as another batch's rows.
    output = tmp_path / "out.jsonl"
    run(captioner, [image_dir], output, batch_size=2)
    rows = jsonl_rows(output)
    images = sorted_images(image_dir)
    for first in range(0, 13, 2):
        pixel_values = captioner.preprocess(images[first:first + 2])
        if len(pixel_values) == 1:  # the last batch is padded with its first image
            pixel_values = np.repeat(pixel_values, 2, axis=0)
        direct = captioner.generate(pixel_values, **BEAM_SETTINGS)
        per_image = len(direct.scores) // 2
        chunk = rows[first:first + 2]
        assert [row["caption"] for row in chunk] == captioner.decode(
            direct.sequences[::per_image])[:len(chunk)]
        np.testing.assert_allclose([row["score"] for row in chunk],
                                   np.asarray(direct.scores)[::per_image][:len(chunk)],
                                   rtol=1e-6)


def test_every_input_kind_gives_the_same_captions(captioner, image_dir, tmp_path):
    images = sorted_images(image_dir)
    reference_output = tmp_path / "reference.jsonl"
    run(captioner, images, reference_output)
    reference = {row["image"]: row for row in jsonl_rows(reference_output)}

    (tmp_path / "list.txt").write_text(
        "# images\n" + "\n".join(os.path.relpath(path, tmp_path) for path in images[:5]) + "\n\n")
    with open(tmp_path / "list.csv", "w") as handle:
        handle.write("caption,image\n")
        handle.writelines(f"x,{os.path.relpath(path, tmp_path)}\n" for path in images[5:8])
    glob_pattern = str(image_dir / "b" / "*.png")
    kinds = [images[8], str(tmp_path / "list.txt"), str(tmp_path / "list.csv"), glob_pattern,
             str(image_dir / "a")]
    output = tmp_path / "kinds.jsonl"
    run(captioner, kinds, output)
    rows = jsonl_rows(output)
    globbed = sorted(str(path) for path in (image_dir / "b").glob("*.png"))
    from_dir = sorted_images(image_dir / "a")
    listed = [os.path.join(str(tmp_path), os.path.relpath(path, tmp_path)) for path in images[:8]]
    assert [row["image"] for row in rows] == [images[8], *listed, *globbed, *from_dir]
    for row in rows:
        expected = reference[os.path.normpath(row["image"])]
        assert (row["caption"], row["score"]) == (expected["caption"], expected["score"])


def test_tar_shards_caption_members_like_files(captioner, tmp_path):
    seeds = [3, 1, 4, 1_5, 9, 2]
    shard = write_tar(tmp_path / "00000.tar", webdataset_members(seeds))
    files = []
    for seed in seeds:
        path = tmp_path / "files" / f"{seed:09d}.jpg"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(image_bytes(seed))
        files.append(path)
    run(captioner, [shard], tmp_path / "tar.jsonl")
    run(captioner, files, tmp_path / "files.jsonl")
    tar_rows, file_rows = jsonl_rows(tmp_path / "tar.jsonl"), jsonl_rows(tmp_path / "files.jsonl")
    assert [row["image"] for row in tar_rows] == [f"{shard}/{seed:09d}.jpg" for seed in seeds]
    assert [(r["caption"], r["score"]) for r in tar_rows] == \
        [(r["caption"], r["score"]) for r in file_rows]


def test_parquet_output_holds_the_jsonl_rows(captioner, image_dir, tmp_path):
    (image_dir / "broken.jpg").write_bytes(b"not a jpeg")
    run(captioner, [image_dir], tmp_path / "out.jsonl")
    stats = run(captioner, [image_dir], tmp_path / "out.parquet")
    assert stats.errors == 1
    assert not (tmp_path / "out.parquet.chunks").exists()
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column_names == ["image", "caption", "score", "error", "token_logprobs",
                                  "sequences"]
    assert list(read_rows(str(tmp_path / "out.parquet"), "parquet")) == \
        jsonl_rows(tmp_path / "out.jsonl")


def test_stdout_output_is_jsonl_with_progress_on_stderr_and_the_summary_returned(
        captioner, image_dir, capsys):
    stats = run(captioner, [image_dir / "a"], None, progress=True)
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [row["image"] for row in rows] == sorted_images(image_dir / "a")
    assert stats.captioned == len(rows) == 7
    assert "7/7" in captured.err and "img/s" in captured.err  # the tqdm bar, with its total
    assert stats.summary().startswith("captioned 7 images (0 errors) in ")
    assert "captioned 7 images" not in captured.err  # the library prints no summary


def test_bad_inputs_become_error_rows_and_the_rest_goes_on(captioner, tmp_path):
    good = [write_image(tmp_path / f"good{seed}.png", seed) for seed in range(3)]
    (tmp_path / "text.jpg").write_text("plain text")
    (tmp_path / "empty.png").write_bytes(b"")
    truncated = image_bytes(7, "PNG")
    (tmp_path / "truncated.png").write_bytes(truncated[: len(truncated) // 2])
    (tmp_path / "list.txt").write_text("good0.png\nmissing.jpg\n")
    corrupt_member = write_tar(tmp_path / "corrupt.tar", webdataset_members([1]) + [
        ("000000002.jpg", b"\xff\xd8 garbage"), *webdataset_members([3])])
    full = webdataset_members([4, 5, 6])
    ends_early = tmp_path / "ends_early.tar"
    payload = write_tar(tmp_path / "whole.tar", full).read_bytes()
    # Cut inside the second image's data, 100 bytes after its 512-byte header.
    cut = payload.find(b"000000005.jpg") + 512 + 100
    ends_early.write_bytes(payload[:cut])
    bad_header = bytearray(payload)
    second_header = payload.find(b"000000005.jpg")
    bad_header[second_header:second_header + 512] = b"\x07" * 512
    (tmp_path / "bad_header.tar").write_bytes(bytes(bad_header))

    inputs = [*good[:2], tmp_path / "text.jpg", tmp_path / "empty.png",
              tmp_path / "truncated.png", tmp_path / "list.txt", tmp_path / "nothere.png",
              corrupt_member, ends_early, tmp_path / "bad_header.tar", good[2]]
    output = tmp_path / "out.jsonl"
    stats = run(captioner, inputs, output, batch_size=2)
    rows = jsonl_rows(output)
    by_image = {row["image"]: row for row in rows}
    errors = {image: row["error"] for image, row in by_image.items() if "error" in row}
    assert set(errors) == {
        str(tmp_path / "text.jpg"), str(tmp_path / "empty.png"), str(tmp_path / "truncated.png"),
        str(tmp_path / "missing.jpg"), str(tmp_path / "nothere.png"),
        f"{corrupt_member}/000000002.jpg", f"{ends_early}/000000005.jpg", str(ends_early),
        str(tmp_path / "bad_header.tar")}
    assert "no such file" in errors[str(tmp_path / "missing.jpg")]
    assert "empty" in errors[str(tmp_path / "empty.png")]
    assert "ends early" in errors[str(ends_early)]
    assert "invalid tar header" in errors[str(tmp_path / "bad_header.tar")]
    captioned = [row["image"] for row in rows if "caption" in row]
    assert captioned == [
        str(good[0]), str(good[1]), str(tmp_path / "good0.png"),
        f"{corrupt_member}/000000001.jpg", f"{corrupt_member}/000000003.jpg",
        f"{ends_early}/000000004.jpg", f"{tmp_path / 'bad_header.tar'}/000000004.jpg",
        str(good[2])]
    assert (stats.captioned, stats.errors) == (len(captioned), len(errors)) == (8, 9)


def test_unwritable_output_fails_before_any_work(captioner, image_dir, tmp_path):
    class NeverCalled:
        settings = captioner.settings  # validated before the writer probes the output

        @property
        def preprocess_config(self):
            raise AssertionError("the pipeline started work")

    (tmp_path / "a_file").write_text("")
    for output, cause in [(tmp_path / "missing_dir" / "out.jsonl", "does not exist"),
                          (tmp_path / "a_file" / "out.jsonl", "does not exist")]:
        with pytest.raises(OutputError, match=cause) as raised:
            run(NeverCalled(), [image_dir], output, output_format="jsonl")
        assert "\n" not in str(raised.value) and str(output) in str(raised.value)
    with pytest.raises(ValueError, match=f"^{tmp_path}: is a folder; name a file in it, e.g. "
                                         f"{tmp_path}/captions.jsonl$"):
        run(NeverCalled(), [image_dir], tmp_path, output_format="jsonl")


def test_glob_without_match_fails_before_any_work(tmp_path, captioner):
    with pytest.raises(DataError, match="no files match"):
        run(captioner, [tmp_path / "*.jpg"], tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_a_directory_without_images_fails_before_any_work(tmp_path, captioner):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"empty: no image files in this directory"):
        run(captioner, [tmp_path / "empty"], tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_inputs_naming_no_image_are_an_error_not_a_silent_success(tmp_path, captioner, capsys):
    (tmp_path / "list.txt").write_text("# nothing listed\n")
    with pytest.raises(DataError, match="no images to caption"):
        run(captioner, [tmp_path / "list.txt"], None)
    assert capsys.readouterr().out == ""


def test_preflight_fails_without_loading_jax_and_its_listing_feeds_the_run(
        tmp_path, captioner, image_dir, subprocess_env):
    empty_list = tmp_path / "list.txt"
    empty_list.write_text("# nothing listed\n")
    probe = textwrap.dedent(f"""
        import sys
        from flax_captioner.errors import DataError
        from flax_captioner.preflight import check_run
        try:
            check_run([{str(empty_list)!r}], None)
        except DataError as error:
            print(error)
        print("jax imported:", "jax" in sys.modules)
    """)
    printed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             check=True, env=subprocess_env).stdout
    assert printed.splitlines() == [f"{empty_list}: no images to caption", "jax imported: False"]

    output = tmp_path / "out.parquet"
    checked, output_format = check_run([str(image_dir)], str(output))
    assert output_format == "parquet" and not output.exists()
    stats = run_pipeline(checked, str(output), CaptionOptions(batch_size=4, **BEAM_SETTINGS),
                         captioner)
    assert stats.captioned == 13
    assert sorted(row["image"] for row in read_rows(str(output), "parquet")) == sorted(
        str(path) for path in image_dir.rglob("img*"))


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_every_returned_sequence_is_written_ranked(captioner, image_dir, tmp_path, suffix):
    (image_dir / "broken.jpg").write_bytes(b"not a jpeg")
    settings = {"num_beams": 3, "max_length": 6, "num_return_sequences": 3}
    output = tmp_path / f"out{suffix}"
    stats = run(captioner, [image_dir], output, settings=settings, batch_size=5)
    rows = list(read_rows(str(output), suffix[1:]))
    assert len(rows) == 14 and stats.captioned == 13 and stats.errors == 1
    images = [row["image"] for row in rows if "error" not in row]
    direct = captioner.generate(captioner.preprocess(images), **settings)
    captions = captioner.decode(direct.sequences)
    for index, row in enumerate(row for row in rows if "error" not in row):
        ranked = row["sequences"]
        assert [sequence["rank"] for sequence in ranked] == [1, 2, 3]
        assert [sequence["caption"] for sequence in ranked] == captions[3 * index:3 * index + 3]
        np.testing.assert_allclose([sequence["score"] for sequence in ranked],
                                   direct.scores[3 * index:3 * index + 3], rtol=1e-6)
        assert (row["caption"], row["score"]) == (ranked[0]["caption"], ranked[0]["score"])
        assert ranked[0]["score"] >= ranked[1]["score"] >= ranked[2]["score"]


@pytest.mark.parametrize("settings", [
    {"num_beams": 1, "max_length": 6},
    {"num_beams": 3, "max_length": 6, "num_return_sequences": 2, "length_penalty": 1.0}])
def test_token_logprobs_account_for_each_score(captioner, image_dir, tmp_path, settings):
    output = tmp_path / "out.parquet"
    run(captioner, [image_dir / "a"], output, settings=settings, token_logprobs=True)
    rows = list(read_rows(str(output), "parquet"))
    assert len(rows) == 7
    for row in rows:
        for sequence in row.get("sequences", [row]):
            logprobs = sequence["token_logprobs"]
            assert 1 <= len(logprobs) <= 5 and all(value <= 0 for value in logprobs)
            # greedy: the summed log-probs; beam search: divided by the generated length
            # (EOS included) ** length_penalty, as PyTorch's sequences_scores.
            expected = sum(logprobs) / (len(logprobs) if settings["num_beams"] > 1 else 1)
            assert sequence["score"] == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_per_step_arrays_are_refused_for_rows(captioner, image_dir, tmp_path):
    with pytest.raises(ValueError, match="output_scores and output_logits are per-step"):
        run(captioner, [image_dir], tmp_path / "out.jsonl", settings={"output_scores": True})
    assert not (tmp_path / "out.jsonl").exists()


def test_torn_last_line_is_repaired_on_resume(captioner, image_dir, tmp_path):
    images = sorted_images(image_dir)
    reference = tmp_path / "reference.jsonl"
    run(captioner, images, reference)
    output = tmp_path / "out.jsonl"
    run(captioner, images[:8], output)
    with open(output, "a") as handle:
        handle.write('{"image": "half a ro')  # what a kill in mid-write leaves
    stats = run(captioner, images, output)
    assert stats.resumed == 8 and stats.captioned == 5
    assert output.read_text() == reference.read_text()


def test_resume_rejects_an_output_of_other_inputs(captioner, image_dir, tmp_path):
    images = sorted_images(image_dir)
    output = tmp_path / "out.jsonl"
    run(captioner, images[:4], output)
    with pytest.raises(OutputError, match="made from other inputs"):
        run(captioner, images[1:], output)
    stats = run(captioner, images[1:], output, resume=False)
    assert stats.resumed == 0 and len(jsonl_rows(output)) == 12


def test_finished_parquet_output_extends_on_resume(captioner, image_dir, tmp_path):
    images = sorted_images(image_dir)
    run(captioner, images, tmp_path / "reference.parquet")
    output = tmp_path / "out.parquet"
    run(captioner, images[:6], output)
    stats = run(captioner, images, output)
    assert stats.resumed == 6
    assert pq.read_table(output).equals(pq.read_table(tmp_path / "reference.parquet"))


def test_final_partial_batch_reuses_the_full_batch_program(captioner, image_dir, tmp_path,
                                                          monkeypatch):
    shapes = []
    dispatch = captioner.generator.dispatch

    def recording_dispatch(pixel_values, *args, **kwargs):
        shapes.append(pixel_values.shape[0])
        return dispatch(pixel_values, *args, **kwargs)

    monkeypatch.setattr(captioner.generator, "dispatch", recording_dispatch)
    run(captioner, [image_dir], tmp_path / "out.jsonl", batch_size=4)
    run(captioner, sorted_images(image_dir)[:3], tmp_path / "small.jsonl", batch_size=4)
    # 13 images: three full batches, then the last image padded to the full batch size;
    # a run smaller than one batch compiles only its own size.
    assert shapes == [4, 4, 4, 4, 3]
    assert len(jsonl_rows(tmp_path / "out.jsonl")) == 13


def test_the_next_batch_is_dispatched_before_a_batch_is_waited_for(captioner, image_dir,
                                                                   tmp_path, monkeypatch):
    """The devices run batch i + 1 while the loop waits for batch i and writes its rows."""
    from flax_captioner.generator import Dispatched

    events = []
    dispatch, result = captioner.generator.dispatch, Dispatched.result

    def recording_dispatch(pixel_values, *args, first_index, **kwargs):
        events.append(("dispatch", first_index))
        return dispatch(pixel_values, *args, first_index=first_index, **kwargs)

    monkeypatch.setattr(captioner.generator, "dispatch", recording_dispatch)
    monkeypatch.setattr(Dispatched, "result",
                        lambda self: events.append(("result", len(events))) or result(self))
    run(captioner, [image_dir], tmp_path / "out.jsonl", batch_size=4)
    order = [event if kind == "dispatch" else "result" for kind, event in events]
    assert order == [0, 4, "result", 8, "result", 12, "result", "result"]
    assert len(jsonl_rows(tmp_path / "out.jsonl")) == 13


@pytest.mark.parametrize("output,options,message", [
    ("out.txt", {}, "out.txt: unknown output suffix '.txt'; use .jsonl, .parquet or .pq, or "
                    "set output_format"),
    ("out.json", {}, "out.json: a .json output would hold JSON Lines, which json.load cannot "
                     "read; name it .jsonl"),
    ("out.jsonl", {"output_format": "parquet"},
     "out.jsonl: the suffix .jsonl names jsonl output, not the parquet asked for"),
    (None, {"output_format": "parquet"}, "Parquet output needs an output file"),
])
def test_outputs_without_one_clear_format_are_refused_before_loading(image_dir, tmp_path,
                                                                    output, options, message):
    """The command line's rule: run_pipeline refuses what `caption -o` refuses, before it
    loads the model (which does not exist here)."""
    options = CaptionOptions(model=str(tmp_path / "no-model"), **options)
    with pytest.raises(ValueError, match=re.escape(message)):
        run_pipeline([str(image_dir)], output and str(tmp_path / output), options)
    assert [path.name for path in tmp_path.iterdir()] == ["images"]


def test_without_a_captioner_the_run_loads_the_options_model(captioner, captioner_source,
                                                             image_dir, tmp_path):
    run(captioner, [image_dir], tmp_path / "reference.jsonl")
    options = CaptionOptions(model=captioner_source, batch_size=4, decode_threads=2,
                             **BEAM_SETTINGS)
    stats = run_pipeline([str(image_dir)], str(tmp_path / "out.jsonl"), options)
    assert stats.captioned == 13 and stats.load_seconds > 0
    assert jsonl_rows(tmp_path / "out.jsonl") == jsonl_rows(tmp_path / "reference.jsonl")
    with pytest.raises(ModelLoadError):
        run_pipeline([str(image_dir)], str(tmp_path / "other.jsonl"),
                     options.replace(model=str(tmp_path / "missing")))


@pytest.mark.parametrize("options,workers", [
    ({"decode_threads": 4}, (4, False)),
    ({"decode_threads": 5}, (5, True)),  # processes past 4 threads, as on the command line
    ({"decode_threads": 5, "decode_processes": False}, (5, False)),
    ({"decode_threads": 2, "decode_processes": True}, (2, True)),
    ({}, (os.cpu_count(), os.cpu_count() > 4)),
])
def test_decoding_workers_follow_one_rule(options, workers):
    assert decode_workers(CaptionOptions(**options)) == workers


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_merge_interleaves_parts_in_input_order(tmp_path, suffix):
    output = str(tmp_path / f"out{suffix}")
    output_format = suffix[1:]
    rows = [{"image": f"img{index}", "caption": f"c{index}", "score": -0.25 * index}
            for index in range(7)]
    rows[4] = {"image": "img4", "error": "not an image PIL can identify"}
    for process in range(3):
        write_rows(part_path(output, process, 3), output_format, rows[process::3])
    assert merge_shards(output) == 7
    assert list(read_rows(output, output_format)) == rows
    assert not list(tmp_path.glob("out*.part-*"))


def test_merge_refuses_unfinished_parts(tmp_path):
    output = str(tmp_path / "out.jsonl")
    with pytest.raises(OutputError, match="no part files"):
        merge_shards(output)
    for process, count in [(0, 3), (1, 1)]:
        with open(part_path(output, process, 2), "w") as handle:
            handle.writelines('{"image": "x", "error": "e"}\n' for _ in range(count))
    with pytest.raises(OutputError, match="cannot come from one finished run") as raised:
        merge_shards(output)
    assert raised.value.fix == ("resume_processes",)
    os.remove(part_path(output, 1, 2))
    with pytest.raises(OutputError, match=r"parts \[1\] of 2 are missing"):
        merge_shards(output)


# A subprocess that captions slowly enough to be killed mid-run.
SLOW_RUN_SCRIPT = textwrap.dedent("""
    import sys, time
    from flax_captioner import CaptionOptions
    from flax_captioner.captioner import Captioner
    from flax_captioner.pipeline import run_pipeline
    from flax_captioner.errors import CaptionerError

    captioner = Captioner.from_pretrained(sys.argv[1])
    dispatch = captioner.generator.dispatch
    def slow_dispatch(*args, **kwargs):
        time.sleep(0.3)
        return dispatch(*args, **kwargs)
    captioner.generator.dispatch = slow_dispatch
    try:
        run_pipeline([sys.argv[2]], sys.argv[3],
                     CaptionOptions(batch_size=2, num_beams=2, max_length=6, decode_threads=1,
                                    flush_seconds=0), captioner)
    except CaptionerError as error:
        print(error, file=sys.stderr)
        sys.exit(3)
""")


def start_slow_run(checkpoint, inputs: Path, output: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_RUN_SCRIPT, str(checkpoint), str(inputs), str(output)], stderr=subprocess.PIPE, text=True, env=env)


def wait_for_rows(output: Path, count: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        chunks = output.with_name(output.name + ".chunks")
        done = (len(list(chunks.glob("chunk-*.parquet"))) * 2 if chunks.exists()
                else len(output.read_bytes().splitlines()) if output.exists() else 0)
        if done >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{output} never reached {count} rows")


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_resume_after_sigkill_and_sigterm_loses_and_repeats_nothing(
        captioner, captioner_source, subprocess_env, image_dir, tmp_path, suffix):
    reference = tmp_path / f"reference{suffix}"
    run(captioner, [image_dir], reference, batch_size=2, decode_threads=1)
    output = tmp_path / f"out{suffix}"
    killed = start_slow_run(captioner_source, image_dir, output, subprocess_env)
    wait_for_rows(output, 4, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()

    stopped = start_slow_run(captioner_source, image_dir, output, subprocess_env)
    wait_for_rows(output, 8, stopped)
    stopped.send_signal(signal.SIGTERM)
    _, stderr = stopped.communicate(timeout=120)
    assert stopped.returncode == 3 and "run again with the same output to resume" in stderr

    stats = run(captioner, [image_dir], output, batch_size=2, decode_threads=1)
    assert 0 < stats.resumed < 13 and stats.resumed + stats.captioned == 13
    if suffix == ".jsonl":
        assert output.read_text() == reference.read_text()
    else:
        assert pq.read_table(output).equals(pq.read_table(reference))


def test_fast_decode_rows_are_those_of_the_fast_pixels(captioner, tmp_path):
    """Large JPEGs: the pipeline's ``fast_decode`` rows score the DCT-reduced pixels."""
    side = captioner.preprocess_config.size[0] * 8
    paths = [str(write_image(tmp_path / "big" / f"img{seed}.jpg", seed, size=(side, side)))
             for seed in range(3)]
    output = tmp_path / "fast.jsonl"
    run(captioner, paths, output, fast_decode=True)
    scores = [row["score"] for row in jsonl_rows(output)]
    for fast in (True, False):
        direct = captioner.generate(captioner.preprocess(paths, fast_decode=fast),
                                    **BEAM_SETTINGS)
        best = np.asarray(direct.scores)[::len(direct.scores) // 3]
        assert np.allclose(scores, best, rtol=1e-6) == fast
