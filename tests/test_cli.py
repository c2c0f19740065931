"""The command line end to end: output rows, exit codes, one-line errors, Captioner API."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flax_captioner import backend, cli, decode_processes, errors
from flax_captioner.captioner import Captioner
from flax_captioner.errors import FIXES, ImageReadError
from flax_captioner.generator import Generator
from flax_captioner.options import CaptionOptions
from flax_captioner.settings import GenerationSettings

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "examples" / "shapes-captioner"
SAMPLES = REPO / "examples" / "images"
HEAVY_MODULES = ["jax", "transformers", "torch", "flax", "flax_captioner.train"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flax_captioner.cli", *args],
                          capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Three small RGB images in a nested directory, plus one text file posing as a JPEG."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for index, name in enumerate(["a.png", "b.jpg", "sub/c.png"]):
        path = root / name
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20 + index, 30, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    (root / "broken.jpg").write_text("not an image")
    return paths


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint) -> Captioner:
    return Captioner.from_pretrained(tiny_checkpoint, parallelism="none")


def test_caption_api_matches_generate(captioner, images):
    captions = captioner.caption(images, num_beams=3, max_length=10, batch_size=2)
    pixel_values = captioner.preprocess(images)
    output = captioner.generate(pixel_values, num_beams=3, max_length=10)
    assert output.sequences.shape == (3, 10) and output.sequences.dtype == np.int32
    assert output.scores.shape == (3,) and output.scores.dtype == np.float32
    assert (output.sequences[:, 0] == captioner.generation_defaults.decoder_start_token_id).all()
    assert captions == captioner.decode(output.sequences)
    assert captioner.caption(Image.open(images[0]), num_beams=3, max_length=10) == captions[:1]


def test_caption_api_names_unreadable_input(captioner, images):
    broken = images[0].parent / "broken.jpg"
    with pytest.raises(ImageReadError, match="broken.jpg"):
        captioner.caption([images[0], broken])


def test_cli_captions_directory_in_input_order_with_error_rows(tiny_checkpoint, images,
                                                               tmp_path):
    output = tmp_path / "captions.jsonl"
    root = images[0].parent
    result = run_cli("caption", str(root), "--model", str(tiny_checkpoint), "--output",
                     str(output), "--num-beams", "2", "--max-length", "8",
                     "--parallelism", "none")
    assert result.returncode == 3, result.stderr  # broken.jpg failed, the rest were written
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [Path(row["image"]).name for row in rows] == ["a.png", "b.jpg", "broken.jpg", "c.png"]
    assert "error" in rows[2] and "caption" not in rows[2]
    captioner = Captioner.from_pretrained(tiny_checkpoint, parallelism="none")
    expected = captioner.caption(images, num_beams=2, max_length=8)
    assert [row["caption"] for row in rows if "caption" in row] == expected
    assert "Traceback" not in result.stderr


def test_cli_stdout_and_exit_zero(tiny_checkpoint, images):
    result = run_cli("caption", str(images[0]), str(images[1]), "--model", str(tiny_checkpoint),
                     "--num-beams", "1", "--max-length", "6", "--parallelism", "none")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["image"] for row in rows] == [str(images[0]), str(images[1])]


def test_cli_missing_model_is_one_line(images, tmp_path):
    result = run_cli("caption", str(images[0]), "--model", str(tmp_path / "missing"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"flax-captioner: error: {tmp_path / 'missing'}: no such directory")


def test_cli_parity_on_shipped_checkpoint(tmp_path):
    """The parity tool on a Flax-only directory (PyTorch gets the same weights)."""
    repo = Path(__file__).resolve().parents[1]
    flax_only = tmp_path / "flax"
    assert run_cli("convert", str(repo / "examples/shapes-captioner"), str(flax_only)).returncode == 0
    images = sorted(str(path) for path in (repo / "examples/images").glob("*.png"))[:3]
    result = run_cli("parity", "--model", str(flax_only), *images, "--num-beams", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    per_image = [line for line in lines if line.split(": ")[0] in images]
    assert [line.split(": ")[0] for line in per_image] == images
    assert all(": match," in line for line in per_image)
    assert lines[-1].startswith("images matching: 3/3; captions matching: 3/3")


def test_cli_parity_takes_a_folder_and_reports_an_unreadable_image(tmp_path):
    """A folder is listed as caption lists it; an image that cannot be read is reported and
    the others compared (exit 3, as a caption run with error rows)."""
    for name in ("shapes_0.png", "shapes_1.png"):
        shutil.copy(SAMPLES / name, tmp_path / name)
    (tmp_path / "broken.png").write_text("not an image")
    result = run_cli("parity", "--model", str(SHAPES), str(tmp_path), "--num-beams", "2")
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(": ")[0] for line in lines[1:-1]] == [
        str(tmp_path / "shapes_0.png"), str(tmp_path / "shapes_1.png"),
        str(tmp_path / "broken.png")]
    assert lines[3].startswith(f"{tmp_path / 'broken.png'}: NOT COMPARED, unreadable: ")
    assert lines[-1].startswith("images matching: 2/2; captions matching: 2/2")
    assert lines[-1].endswith("; 1 input unreadable")


# ---------------------------------------------------------------------------------------
# Fail fast: every bad flag value, input and output is one line, before JAX is imported.
# ---------------------------------------------------------------------------------------

# Runs cli.main over argv lists in one fresh interpreter; reports each status, stdout and
# stderr, and which heavy modules got imported along the way.
_PROBE = """
import contextlib, io, json, sys
from flax_captioner.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    results.append({"status": status, "stdout": out.getvalue(), "stderr": err.getvalue()})
heavy = [name for name in json.loads(sys.argv[2]) if name in sys.modules]
print(json.dumps({"results": results, "heavy": heavy}))
"""


def probe(argvs: list[list[str]]) -> dict:
    result = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argvs),
                             json.dumps(HEAVY_MODULES)],
                            capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


COMMANDS = ["caption", "merge", "convert", "parity", "train"]


def test_help_imports_no_jax_transformers_or_trainer():
    report = probe([["--help"]] + [[command, "--help"] for command in COMMANDS])
    assert report["heavy"] == []
    for argv, result in zip([["--help"]] + [[c, "--help"] for c in COMMANDS], report["results"]):
        assert result["status"] == 0, argv
        assert result["stdout"].startswith(" ".join(["usage: flax-captioner", *argv[:-1]]))
        assert result["stderr"] == ""
    caption_help = " ".join(report["results"][1]["stdout"].split())
    assert "exit status: 0 every image captioned; 1 the run could not finish" in caption_help
    assert "3 the run finished, but some inputs became error rows" in caption_help
    # caption refuses them (rows hold per-token log-probabilities); parity compares searches.
    assert "--output-scores" not in caption_help and "--output-logits" not in caption_help
    parity_help = report["results"][4]["stdout"]
    assert "--do-sample" not in parity_help and "--seed" not in parity_help
    assert "--output-scores" in parity_help
    # An unset option shows no default, not "[]".
    assert "[]" not in report["results"][5]["stdout"]
    # The defaults the help states are backend.py's (which --help must not import).
    assert (f"[{backend.CPU_BATCH_SIZE} on CPU; {backend.ACCELERATOR_BATCH_PER_DEVICE} per "
            "GPU/TPU chip, fewer if its memory is short]") in caption_help
    assert "nlpconnect/vit-gpt2-image-captioning" in caption_help
    assert f"[on with more than {decode_processes.THREADS_UP_TO} threads]" in caption_help


# (name, arguments after the command, exit status, text the one error line holds). Paths
# in capitals are filled in by the bad_inputs fixture.
BAD_INPUTS = [
    # generation flags: valid JSON or not, every bad value is a usage error
    ("flat bad words", ["caption", "IMAGES", "--bad-words-ids", "[12]"], 2,
     "--bad-words-ids must be a list of non-empty token-id lists such as [[12], [7, 8]], "
     "got [12]"),
    ("mixed bad words", ["caption", "IMAGES", "--bad-words-ids", "[[12], 7]"], 2,
     "--bad-words-ids must be"),
    ("negative bad word", ["caption", "IMAGES", "--bad-words-ids", "[[-1]]"], 2,
     "--bad-words-ids must be"),
    ("bad words string", ["caption", "IMAGES", "--bad-words-ids", '"12"'], 2,
     "--bad-words-ids must be"),
    ("bad words not JSON", ["caption", "IMAGES", "--bad-words-ids", "[[12"], 2,
     "argument --bad-words-ids: not valid JSON"),
    ("zero beams", ["caption", "IMAGES", "--num-beams", "0"], 2,
     "--num-beams must be an integer >= 1, got 0"),
    ("beams not int", ["caption", "IMAGES", "--num-beams", "zero"], 2,
     "argument --num-beams: invalid int value: 'zero'"),
    ("max length 1", ["caption", "IMAGES", "--max-length", "1"], 2, "--max-length must be"),
    ("no new tokens", ["caption", "IMAGES", "--max-new-tokens", "0"], 2,
     "--max-new-tokens must be"),
    ("negative min length", ["caption", "IMAGES", "--min-length", "-1"], 2,
     "--min-length must be"),
    ("nan length penalty", ["caption", "IMAGES", "--length-penalty", "nan"], 2,
     "--length-penalty must be a finite number, got nan"),
    ("zero sequences", ["caption", "IMAGES", "--num-return-sequences", "0"], 2,
     "--num-return-sequences must be"),
    ("negative ngram", ["caption", "IMAGES", "--no-repeat-ngram-size", "-2"], 2,
     "--no-repeat-ngram-size must be"),
    ("zero repetition penalty", ["caption", "IMAGES", "--repetition-penalty", "0"], 2,
     "--repetition-penalty must be a number > 0"),
    ("negative temperature", ["caption", "IMAGES", "--temperature", "-1"], 2,
     "--temperature must be"),
    ("negative top-k", ["caption", "IMAGES", "--top-k", "-1"], 2, "--top-k must be"),
    ("top-p above 1", ["caption", "IMAGES", "--top-p", "1.5"], 2,
     "--top-p must be in (0, 1], got 1.5"),
    ("early stopping", ["caption", "IMAGES", "--early-stopping", "maybe"], 2,
     "expected true, false or never"),
    ("parity zero beams", ["parity", "IMAGE", "--num-beams", "0"], 2, "--num-beams must be"),
    # the other caption flags
    ("zero threads", ["caption", "IMAGES", "--threads", "0"], 2,
     "argument --threads: must be an integer >= 1, got '0'"),
    ("zero batch", ["caption", "IMAGES", "--batch-size", "0"], 2,
     "argument --batch-size: must be an integer >= 1, got '0'"),
    ("negative batch", ["caption", "IMAGES", "--batch-size", "-3"], 2,
     "argument --batch-size: must be an integer >= 1"),
    ("csv output", ["caption", "IMAGES", "-o", "CSV"], 2,
     "unknown output suffix '.csv'; use .jsonl, .parquet or .pq, or --format"),
    ("json output", ["caption", "IMAGES", "-o", "EMPTY/out.json"], 2,
     "out.json: a .json output would hold JSON Lines, which json.load cannot read; name it "
     ".jsonl"),
    ("format contradicts the suffix", ["caption", "IMAGES", "-o", "EMPTY/out.jsonl",
                                       "--format", "parquet"], 2,
     "out.jsonl: the suffix .jsonl names jsonl output, not the parquet asked for"),
    ("unknown format", ["caption", "IMAGES", "--format", "xml"], 2, "invalid choice: 'xml'"),
    ("parquet to stdout", ["caption", "IMAGES", "--format", "parquet"], 2,
     "Parquet output needs an output file"),
    ("unknown dtype", ["caption", "IMAGES", "--dtype", "float16"], 2, "invalid choice"),
    ("negative sampling seed", ["caption", "IMAGES", "--seed", "-1"], 2,
     "--seed must be in [0, 2**63), got -1"),
    ("huge seed", ["caption", "IMAGES", "--seed", str(2**64)], 2, "--seed must be in"),
    ("cache is a file", ["caption", "IMAGES", "--compilation-cache", "CSV"], 2,
     "out.csv: not a folder"),
    ("no inputs", ["caption"], 2, "the following arguments are required: INPUT"),
    ("unknown command", ["bogus"], 2, "invalid choice: 'bogus'"),
    ("unknown flag", ["caption", "IMAGES", "--beams", "2"], 2, "unrecognized arguments"),
    ("caption output scores", ["caption", "IMAGES", "--output-scores"], 2,
     "unrecognized arguments: --output-scores"),
    ("parity sampling", ["parity", "IMAGE", "--do-sample"], 2,
     "unrecognized arguments: --do-sample"),
    ("wrong image column", ["caption", "TABLE", "--image-column", "photo"], 2,
     "--image-column 'photo' is not a column of "),
    ("wrong id column", ["caption", "TABLE", "--id-column", "name"], 2,
     "--id-column 'name' is not a column of "),
    ("process id without distributed", ["caption", "IMAGES", "--process-id", "0"], 2,
     "--process-id is for a multi-process run: add --distributed"),
    ("process id past the count", ["caption", "IMAGES", "--distributed", "--num-processes",
                                   "2", "--process-id", "2"], 2,
     "--process-id must be < --num-processes (2), got 2"),
    ("coordinator without a port", ["caption", "IMAGES", "--distributed",
                                    "--coordinator-address", "10.0.0.1"], 2,
     "argument --coordinator-address: must be HOST:PORT, e.g. 10.0.0.1:1234, got '10.0.0.1'"),
    ("no processes", ["caption", "IMAGES", "--distributed", "--num-processes", "0"], 2,
     "argument --num-processes: must be an integer >= 1, got '0'"),
    ("negative process id", ["caption", "IMAGES", "--distributed", "--process-id", "-1"], 2,
     "argument --process-id: must be an integer >= 0, got '-1'"),
    # inputs and outputs (exit 1: the arguments parse, the run cannot start)
    ("empty directory", ["caption", "EMPTY"], 1, "empty: no image files in this directory"),
    ("empty path list", ["caption", "LIST"], 1, "list.txt: no images to caption"),
    ("glob matching nothing", ["caption", "EMPTY/*.png"], 1, "no files match this pattern"),
    ("missing path list", ["caption", "EMPTY/paths.txt"], 1, "paths.txt: no such file"),
    ("missing directory", ["caption", "EMPTY/gone/"], 1, "gone/: no such directory"),
    ("output in a missing folder", ["caption", "IMAGES", "-o", "EMPTY/no/out.jsonl"], 1,
     "cannot write the output: directory"),
    ("output is a folder", ["caption", "IMAGES", "-o", "EMPTY", "--format", "jsonl"], 2,
     "empty: is a folder; name a file in it, e.g. "),
    ("parity missing image", ["parity", "EMPTY/missing.png"], 1, "missing.png: no such file"),
    # training flags: TrainConfig.validate, the field shown as its flag
    ("negative learning rate", ["train", "TRAIN", "--learning-rate", "-1"], 2,
     "--learning-rate must be > 0, got -1.0"),
    ("keep no checkpoints", ["train", "TRAIN", "--keep-checkpoints", "0"], 2,
     "--keep-checkpoints must be >= 1, got 0"),
    ("zero train batch", ["train", "TRAIN", "--batch-size", "0"], 2, "--batch-size must be >= 1"),
    ("save every 0", ["train", "TRAIN", "--save-every", "0"], 2, "--save-every must be >= 1"),
    ("no accumulation", ["train", "TRAIN", "--gradient-accumulation-steps", "0"], 2,
     "--gradient-accumulation-steps must be >= 1"),
    ("zero eval batch", ["train", "TRAIN", "--eval-batch-size", "0"], 2,
     "--eval-batch-size must be >= 1"),
    ("eval beams", ["train", "TRAIN", "--num-beams", "0"], 2, "--num-beams must be >= 1"),
    ("eval length", ["train", "TRAIN", "--max-length", "1"], 2, "--max-length must be >= 2"),
    ("target length", ["train", "TRAIN", "--max-target-length", "1"], 2,
     "--max-target-length must be >= 2"),
    ("full smoothing", ["train", "TRAIN", "--label-smoothing", "1"], 2,
     "--label-smoothing must be in [0, 1)"),
    ("beta 1", ["train", "TRAIN", "--adam-beta2", "1"], 2, "--adam-beta2 must be in [0, 1)"),
    ("zero epsilon", ["train", "TRAIN", "--adam-epsilon", "0"], 2, "--adam-epsilon must be > 0"),
    ("negative warmup", ["train", "TRAIN", "--warmup-steps", "-1"], 2,
     "--warmup-steps must be >= 0"),
    ("no epochs", ["train", "TRAIN", "--num-epochs", "0"], 2,
     "--num-epochs must be > 0 when max_steps is 0"),
    ("infinite epochs", ["train", "TRAIN", "--num-epochs", "inf"], 2,
     "--num-epochs must be a finite number"),
    ("negative clip", ["train", "TRAIN", "--max-grad-norm", "-1"], 2,
     "--max-grad-norm must be >= 0"),
    ("negative seed", ["train", "TRAIN", "--seed", "-1"], 2, "--seed must be >= 0"),
    ("rate not a number", ["train", "TRAIN", "--learning-rate", "fast"], 2,
     "argument --learning-rate: invalid float value: 'fast'"),
    ("no training data", ["train", "--model", "SHAPES"], 2, "--train-file is not set"),
    ("model and encoder", ["train", "TRAIN", "--encoder", "x", "--decoder", "y"], 2,
     "--model excludes encoder and decoder"),
    ("missing training data", ["train", "--train-file", "EMPTY/rows.jsonl", "--model", "SHAPES"],
     1, "rows.jsonl: no such file (train_file)"),
    ("run folder is a file", ["train", "TRAIN", "--output-dir", "CSV"], 1,
     "exists and is not a folder (output_dir)"),
    # merge
    ("merge csv", ["merge", "CSV"], 2, "unknown output suffix '.csv'; use .jsonl, .parquet "
                                      "or .pq"),
    ("merge without parts", ["merge", "EMPTY/out.jsonl"], 1, "no part files"),
]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict:
    """Every BAD_INPUTS case run in one fresh interpreter; name -> result, plus "heavy"."""
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    csv = root / "out.csv"
    csv.write_text("kept,as,it,was\n")
    (root / "list.txt").write_text("")
    table = root / "images.parquet"
    pq.write_table(pa.table({"key": ["a"], "jpg": [(SAMPLES / "shapes_0.png").read_bytes()]}),
                   table)
    places = {"IMAGES": str(SAMPLES), "IMAGE": str(SAMPLES / "shapes_0.png"),
              "EMPTY": str(root / "empty"), "CSV": str(csv), "SHAPES": str(SHAPES),
              "LIST": str(root / "list.txt"), "TABLE": str(table)}

    def fill(arg: str) -> list[str]:
        if arg == "TRAIN":
            return ["--train-file", str(SAMPLES / "captions.jsonl"), "--model", str(SHAPES)]
        for key, value in places.items():
            arg = arg.replace(key, value)
        return [arg]

    assert len({case[0] for case in BAD_INPUTS}) == len(BAD_INPUTS)
    argvs = [[part for arg in args for part in fill(arg)] for _, args, _, _ in BAD_INPUTS]
    report = probe(argvs)
    assert csv.read_text() == "kept,as,it,was\n"  # no case touched an existing file
    assert not os.listdir(root / "empty")
    return {"heavy": report["heavy"],
            **{case[0]: result for case, result in zip(BAD_INPUTS, report["results"])}}


def test_bad_inputs_fail_before_importing_jax(bad_inputs):
    assert bad_inputs["heavy"] == []


@pytest.mark.parametrize("name,args,status,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line(bad_inputs, name, args, status, message):
    result = bad_inputs[name]
    lines = result["stderr"].splitlines()
    assert len(lines) == 1, result["stderr"]
    assert lines[0].startswith("flax-captioner: error: ")
    assert message in lines[0]
    assert result["status"] == status
    assert result["stdout"] == ""


def test_every_fix_key_has_a_flag_hint():
    assert set(cli.FIX_HINTS) == set(FIXES)


def test_caption_flags_are_the_caption_options_fields_with_their_defaults():
    """Every CaptionOptions field but the Python-only ones is one caption flag, whose default
    is the field's: the command line and the Python API share every default."""
    args = cli.build_parser().parse_args(["caption", "x.png"])
    actions = {action.dest: action for action in args.command_parser._actions
               if action.option_strings and action.dest not in (
                   "help", "output", "distributed", *cli.DISTRIBUTED_FLAGS)}
    fields = {field.name: field for field in dataclasses.fields(CaptionOptions)}
    python_only = {name for name, field in fields.items() if cli.flag_of(field) is None}
    assert python_only == {"progress", "flush_seconds", "min_new_tokens",
                           "decoder_start_token_id", "pad_token_id", "eos_token_id"}
    assert set(actions) == set(fields) - python_only - set(cli.CAPTION_EXCLUDED)
    for name, action in actions.items():
        assert action.option_strings[0] == cli.flag_of(fields[name])
        assert action.default == fields[name].default, name
    assert cli._caption_options(args) == CaptionOptions()
    # Every generation setting is an option (None: the checkpoint's value).
    settings = {field.name for field in dataclasses.fields(GenerationSettings)}
    assert {name for name, field in fields.items() if field.metadata.get("setting")} == \
        settings | {"max_new_tokens", "min_new_tokens"}


def test_caption_flags_give_their_fields():
    args = cli.build_parser().parse_args([
        "caption", "x.png", "--threads", "3", "--no-decode-processes", "--no-resume",
        "--format", "parquet", "--num-beams", "5", "--do-sample", "--early-stopping", "never",
        "--bad-words-ids", "[[7]]", "--storage-options", '{"anon": true}', "--process-timeout",
        "5", "--dtype", "bfloat16"])
    assert cli._caption_options(args) == CaptionOptions(
        decode_threads=3, decode_processes=False, resume=False, output_format="parquet",
        num_beams=5, do_sample=True, early_stopping="never", bad_words_ids=[[7]],
        storage_options={"anon": True}, process_timeout_seconds=5.0, dtype="bfloat16")


# ---------------------------------------------------------------------------------------
# Runs of the shipped shapes model, in process (cli.main) where no signal or import matters.
# ---------------------------------------------------------------------------------------


def caption_args(output: Path, *extra: str) -> list[str]:
    return ["caption", str(SAMPLES), "--model", str(SHAPES), "--parallelism", "none",
            "--num-beams", "2", "--output", str(output), *extra]


@pytest.fixture(scope="module")
def shapes_rows(tmp_path_factory) -> list[dict]:
    """The eight sample images captioned in one uninterrupted run, three at a time."""
    output = tmp_path_factory.mktemp("whole") / "captions.jsonl"
    assert cli.main(caption_args(output, "--batch-size", "3")) == 0
    return [json.loads(line) for line in output.read_text().splitlines()]


@pytest.mark.parametrize("flags, workers", [(["--threads", "5"], "5 processes"),
                                            (["--threads", "5", "--no-decode-processes"],
                                             "5 threads"),
                                            (["--threads", "2", "--decode-processes"],
                                             "2 processes")])
def test_decoding_runs_in_processes_past_four_threads_unless_told(tmp_path, capsys, shapes_rows,
                                                                   flags, workers):
    output = tmp_path / "captions.jsonl"
    assert cli.main(caption_args(output, "--batch-size", "3", *flags)) == 0
    assert [json.loads(line) for line in output.read_text().splitlines()] == shapes_rows
    assert f"over {workers}," in capsys.readouterr().err


def test_caption_writes_every_sample(shapes_rows):
    assert [Path(row["image"]).name for row in shapes_rows] == [
        f"shapes_{index}.png" for index in range(8)]
    assert all(row["caption"] for row in shapes_rows)


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("flax-captioner: error: ")
    return lines[-1]


def test_resume_onto_other_inputs_names_the_flags_and_keeps_rows(tmp_path, capsys):
    output = tmp_path / "captions.jsonl"
    args = caption_args(output)
    args[1] = str(SAMPLES / "shapes_0.png")
    assert cli.main(args) == 0
    capsys.readouterr()
    before = output.read_bytes()
    args[1] = str(SAMPLES / "shapes_5.png")
    assert cli.main(args) == 1
    line = one_error_line(capsys)
    assert "row 1 of its 1 is" in line and "it was made from other inputs" in line
    assert line.endswith("; add only the inputs it lacks with --extend or start over with "
                         "--no-resume or write to another --output")
    assert output.read_bytes() == before


def test_settings_checked_after_loading_show_the_flag(tmp_path, capsys):
    status = cli.main(caption_args(tmp_path / "out.jsonl", "--num-return-sequences", "3"))
    assert status == 2
    assert one_error_line(capsys) == (
        "flax-captioner: error: --num-return-sequences (3) must be <= num_beams (2)")
    assert not (tmp_path / "out.jsonl").exists()


def test_settings_the_model_cannot_run_show_the_flag(tmp_path, capsys):
    status = cli.main(caption_args(tmp_path / "out.jsonl", "--max-length", "4000"))
    assert status == 2
    line = one_error_line(capsys)
    assert line.startswith("flax-captioner: error: --max-length 4000 exceeds the decoder's ")
    assert not (tmp_path / "out.jsonl").exists()


def test_sigterm_while_captioning_exits_143_and_resumes(shapes_rows, tmp_path, capsys,
                                                        monkeypatch):
    """SIGTERM finishes the batches on the device, keeps their rows, exits 143; a rerun
    completes the output with the rows an uninterrupted run writes."""
    output = tmp_path / "captions.jsonl"
    dispatch = Generator.dispatch

    def dispatch_then_signal(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return dispatch(self, *args, **kwargs)

    monkeypatch.setattr(Generator, "dispatch", dispatch_then_signal)
    assert cli.main(caption_args(output, "--batch-size", "3")) == 128 + signal.SIGTERM
    assert one_error_line(capsys).startswith("flax-captioner: error: interrupted: 3 rows")
    assert len(output.read_text().splitlines()) == 3
    monkeypatch.setattr(Generator, "dispatch", dispatch)
    assert cli.main(caption_args(output, "--batch-size", "3")) == 0
    assert [json.loads(line) for line in output.read_text().splitlines()] == shapes_rows
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main put it back


_SIGNAL_WHILE_LOADING = """
import os, signal, sys, time
# Ctrl-C as a terminal delivers it: a test run started in the background (`pytest &`) hands
# its children SIGINT ignored, and Python then keeps it ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
from flax_captioner import cli, errors
def load(args):
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    time.sleep(30)
cli._load_captioner = load
sys.exit(cli.main(["caption", sys.argv[2]]))
"""


@pytest.mark.parametrize("name,status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_while_loading_is_one_line(name, status):
    result = subprocess.run([sys.executable, "-c", _SIGNAL_WHILE_LOADING, name, str(SAMPLES)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == status
    assert result.stderr == f"flax-captioner: error: interrupted by {name}\n"


def test_closed_stdout_ends_the_run_quietly():
    """`flax-captioner caption DIR | head -2`: no traceback, the status of a SIGPIPE."""
    process = subprocess.Popen(
        [sys.executable, "-m", "flax_captioner.cli", "caption", *[str(SAMPLES)] * 20,
         "--model", str(SHAPES), "--parallelism", "none", "--num-beams", "1",
         "--batch-size", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = [process.stdout.readline(), process.stdout.readline()]
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 128 + signal.SIGPIPE
    assert all(json.loads(line)["caption"] for line in first)
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    assert "error" not in stderr


def test_model_without_tokenizer_is_one_line(tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(SHAPES, model, ignore=shutil.ignore_patterns(
        "vocab.json", "merges.txt", "tokenizer*.json", "special_tokens_map.json"))
    assert cli.main(["caption", str(SAMPLES / "shapes_0.png"), "--model", str(model)]) == 1
    assert one_error_line(capsys).startswith(f"flax-captioner: error: {model}")


def test_exit_status_3_means_finished_with_error_rows_and_the_summary_says_it(tmp_path,
                                                                              capsys):
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    output = tmp_path / "captions.jsonl"
    args = caption_args(output)
    args[1] = str(broken)
    assert cli.main(args) == 3
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    # Nothing was captioned: no rate (error rows never reach the device).
    assert summary.startswith("captioned 0 images (1 error) in ") and "images/s" not in summary
    assert json.loads(output.read_text())["error"]


def test_summary_words_counts_and_rates_captioning_without_compilation():
    from flax_captioner.pipeline import PipelineStats

    stats = PipelineStats(captioned=10, errors=5, wall_seconds=7.0, compile_seconds=2.0,
                          decode_threads=1)
    assert stats.images_per_second == 2.0
    assert stats.summary().startswith(
        "captioned 10 images (5 errors) in 7.0 s, 2.00 images/s excluding compilation; ")
    assert " over 1 thread, " in stats.summary()
    one = PipelineStats(captioned=1, errors=1, resumed=3, wall_seconds=1.0, decode_threads=2,
                        decode_processes=True).summary()
    assert one.startswith("captioned 1 image (1 error, 3 already done) in 1.0 s, ")
    assert " over 2 processes, " in one


def test_the_progress_bar_has_a_total_and_says_compiling_first(tmp_path, capsys):
    from flax_captioner.pipeline import run_pipeline

    captioner = Captioner.from_pretrained(SHAPES, parallelism="none")
    run_pipeline([str(SAMPLES)], str(tmp_path / "out.jsonl"),
                 CaptionOptions(progress=True, batch_size=4, num_beams=1), captioner)
    drawn = capsys.readouterr().err.split("\r")
    assert any(line.startswith("compiling:   0%|") and "| 0/8 [" in line for line in drawn)
    assert any(line.startswith("100%|") and "| 8/8 [" in line for line in drawn)


def test_the_progress_total_counts_local_inputs_that_are_cheap_to_list(tmp_path):
    from flax_captioner import pipeline, sources

    listed = tmp_path / "list.txt"
    listed.write_text(f"{SAMPLES / 'shapes_0.png'}\n{SAMPLES / 'shapes_1.png'}\n")
    checked = sources.check_inputs([str(SAMPLES), str(listed), str(tmp_path / "gone.png")])
    assert pipeline._progress_total(checked, 0, 1) == 11
    assert pipeline._progress_total(checked, 1, 3) == 4  # inputs 1, 4, 7 and 10
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as archive:
        archive.add(SAMPLES / "shapes_0.png", arcname="a.png")
    # Counting a shard's members means reading it: no total.
    assert pipeline._progress_total(sources.check_inputs([str(shard)]), 0, 1) is None


# ---------------------------------------------------------------------------------------
# --distributed from the command line
# ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_distributed_flags_start_two_processes_on_localhost(tmp_path, shapes_rows,
                                                            subprocess_env):
    """Two processes on this host, named by the flags as on hosts no cluster describes: each
    captions every other image, process 0 merges the parts into one run's rows."""
    output = tmp_path / "merged.jsonl"
    address = f"127.0.0.1:{free_port()}"
    processes = [subprocess.Popen(
        [sys.executable, "-m", "flax_captioner.cli", *caption_args(output, "--batch-size", "3"),
         "--distributed", "--coordinator-address", address, "--num-processes", "2",
         "--process-id", str(index)],
        cwd=REPO, env={**subprocess_env, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True) for index in range(2)]
    try:
        stderrs = [process.communicate(timeout=300)[1] for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, stderr in zip(processes, stderrs):
        assert process.returncode == 0, stderr[-3000:]
        assert stderr.strip().splitlines()[-1].startswith("captioned 4 images (0 errors) in ")
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(row["image"], row["caption"]) for row in rows] == [
        (row["image"], row["caption"]) for row in shapes_rows]
    assert not list(tmp_path.glob("merged.jsonl.part-*"))


def test_distributed_without_a_cluster_or_flags_is_a_usage_error(tmp_path):
    cluster_variables = ("SLURM_", "OMPI_", "KUBERNETES_", "TPU_", "JAX_COORDINATOR")
    result = subprocess.run(
        [sys.executable, "-m", "flax_captioner.cli", "caption", str(SAMPLES), "--model",
         str(SHAPES), "-o", str(tmp_path / "out.jsonl"), "--distributed"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**{name: value for name, value in os.environ.items()
                if not name.startswith(cluster_variables)}, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert result.stderr == (
        "flax-captioner: error: --distributed: coordinator_address should be defined; outside "
        "Cloud TPU, SLURM, Open MPI and Kubernetes pass --coordinator-address, --num-processes "
        "and --process-id\n")


# ---------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_finished_training_run_run_again_says_so_and_logs_strict_json(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--model", str(SHAPES), "--train-file", str(SAMPLES / "captions.jsonl"),
            "--validation-file", str(SAMPLES / "captions.jsonl"), "--output-dir", str(run),
            "--max-steps", "1", "--batch-size", "4", "--eval-batch-size", "8",
            "--num-beams", "1", "--max-length", "8", "--no-progress"]
    assert cli.main(args) == 0
    first = capsys.readouterr().err
    # The final evaluation's numbers are printed once: in the summary, not also in a log line.
    assert first.count("eval loss") == 1 and "eval_loss" not in first
    assert first.strip().splitlines()[-1].startswith("step 1, train loss ")
    assert cli.main(args) == 0
    second = capsys.readouterr().err
    assert second.strip().splitlines()[-1].startswith(
        f"step 1: the run had already finished (no training step left to run), exported to "
        f"{run / 'export'}")
    assert "nan" not in second.lower().replace(str(run).lower(), "")

    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    log = (run / "evals" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line, parse_constant=refuse)["step"] for line in log] == [1]


# ---------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------


def write_part(output: Path, index: int, count: int, images: list[str]) -> None:
    Path(f"{output}.part-{index:05d}-of-{count:05d}").write_text(
        "".join(json.dumps({"image": image, "caption": "c"}) + "\n" for image in images))


def test_merge_prints_a_summary(tmp_path, capsys):
    output = tmp_path / "out.jsonl"
    write_part(output, 0, 2, ["a", "c"])
    write_part(output, 1, 2, ["b"])
    assert cli.main(["merge", str(output)]) == 0
    assert capsys.readouterr().err == f"merged 3 rows from 2 parts into {output}\n"
    assert [json.loads(line)["image"] for line in output.read_text().splitlines()] == [
        "a", "b", "c"]


def test_merge_of_unfinished_parts_names_the_remedy(tmp_path, capsys):
    output = tmp_path / "out.jsonl"
    write_part(output, 0, 2, ["a", "c", "e"])
    write_part(output, 1, 2, ["b"])
    assert cli.main(["merge", str(output)]) == 1
    line = one_error_line(capsys)
    assert line.endswith("; rerun the stopped processes with the same --output, then "
                         "`flax-captioner merge`")
    assert not output.exists() and len(list(tmp_path.iterdir())) == 2  # the parts stay


def _raising(error: BaseException):
    def handler(args):
        raise error
    return handler


@pytest.mark.parametrize("error,status,line", [
    (errors.OutputError("out.jsonl: holds rows of other inputs\n(3 rows)",
                        fix=("other_output", "start_over")), 1,
     "out.jsonl: holds rows of other inputs (3 rows); write to another --output or start over "
     "with --no-resume"),
    (errors.ModelLoadError("./ckpt: exists", fix=("overwrite",)), 1,
     "./ckpt: exists; replace it with --overwrite"),
    (errors.NonFiniteLossError("rows.jsonl: training diverged at step 3",
                               fix=("lower_learning_rate", "smaller_batch")), 1,
     "rows.jsonl: training diverged at step 3; lower --learning-rate or raise --warmup-steps "
     "or use a smaller --batch-size N"),
    (errors.DataError("rows.jsonl:1: no caption column"), 1, "rows.jsonl:1: no caption column"),
    (errors.ImageReadError("a.png", "truncated"), 1, "a.png: truncated"),
    (errors.PipelineInterrupted("interrupted: 2 rows written", None, signal.SIGINT), 130,
     "interrupted: 2 rows written"),
    (errors.OptionError("num_beams", "must be an integer >= 1, got 0"), 2,
     "--num-beams must be an integer >= 1, got 0"),
    (errors.OptionError("decode_threads", "must be an integer >= 1, got 0"), 2,
     "--threads must be an integer >= 1, got 0"),
    (errors.OptionError("num_beam_groups", "(group/diverse beam search) is not supported"), 2,
     "num_beam_groups (group/diverse beam search) is not supported"),
    (ValueError("num_beams must be an integer >= 1, got 0"), 2,
     "num_beams must be an integer >= 1, got 0"),  # no typed field: the message as it is
    (ValueError("pixels must be float32"), 2, "pixels must be float32"),
    (PermissionError(13, "Permission denied", "/out/x.jsonl"), 1,
     "/out/x.jsonl: Permission denied"),
    (KeyboardInterrupt(), 130, "interrupted by SIGINT"),
])
def test_errors_become_one_line_with_flag_hints(error, status, line, capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["caption", "x.png"])
    args.handler = _raising(error)
    assert cli._handle(args) == status
    assert capsys.readouterr().err == f"flax-captioner: error: {line}\n"
