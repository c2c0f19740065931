"""README.md and docs/**/*.md are tested as written: every fenced code block runs or is checked.

Each block is one test, ``test_block[FILE:LINE]`` (the line of its opening fence).

- ```python blocks run in a fresh interpreter each, in a sandbox (below), with the shipped
  shapes model for the hub id and for ``Captioner.from_pretrained()``'s default.
- ```bash / ```sh / ```shell blocks are expanded by bash itself (quoting, globs,
  continuations, ``&&``, ``VAR=x cmd``) with a recorder standing in for every command. Each
  ``flax-captioner`` command must parse with the real parser and then runs on the shipped
  examples (the shapes model for the hub id and for a ``--model`` left at its default; a
  ``caption`` must write captions and no error rows); ``pip install`` is not run (CI installs
  first) but its requirement files and ``.[extras]`` must exist; ``python -m scripts.X`` must
  exist and answer ``--help``, then runs; any other command fails: mark the block.
- The sandbox reads like the repository root (its entries linked) plus the reader's own files
  the docs name (``USER_FILES``: cats.jpg, photos/, list.txt, shard-0000.tar, ... made from
  examples/images). A new example file name goes into that table, not into the docs.
- ``<!-- doc-test: parse-only (needs the hub) -->`` on the line before a fence (blank lines
  allowed) marks a block that cannot run here: the hub, a cloud bucket, a TPU pod, a GPU, a long
  training run. It is still checked: its ``flax-captioner`` commands (also inside ``srun ...``
  or ``--command='...'``) must parse, its pip lines are checked, its scripts answer ``--help``;
  Python must compile, its ``flax_captioner`` imports resolve and its calls of them bind to
  their signatures.
- Every fence needs a language tag; ```text (json, yaml, ...) blocks are not code and skipped.

Speed: the shell blocks' flax-captioner commands share one worker interpreter (``cli.main``
per command), and all runners share one XLA compilation cache, so each search compiles once.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib
import inspect
import io
import json
import os
import re
import runpy
import select
import shutil
import subprocess
import sys
import tarfile
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = (REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")))
SHAPES = REPO / "examples" / "shapes-captioner"
SAMPLES = REPO / "examples" / "images"
CI_SCRIPT = REPO / ".ci" / "run"

# The hub is unreachable in tests: this id, and a Captioner.from_pretrained() or a
# flax-captioner --model left at this default, mean the shipped shapes model instead.
HUB_ID = "nlpconnect/vit-gpt2-image-captioning"

# Names the docs give the reader's own inputs -> the shipped sample images (or model) the
# sandbox holds under that name. A doc example using a new name adds it here.
USER_FILES: dict[str, str | tuple[str, ...]] = {
    "cats.jpg": "shapes_0.png",
    "dog.png": "shapes_1.png",
    "img.jpg": "shapes_2.png",
    "photos/a.png": "shapes_3.png",
    "photos/b/c.png": "shapes_4.png",
    "more/set-1/d.jpg": "shapes_5.png",
    "list.txt": ("shapes_6.png", "shapes_7.png"),    # one path per line
    "shard-0000.tar": ("shapes_0.png", "shapes_1.png"),  # a WebDataset shard
    "my-checkpoint": "shapes-captioner",
}

LANGUAGES = {"python": "python", "py": "python", "bash": "shell", "sh": "shell",
             "shell": "shell"}
NOT_CODE = frozenset({"text", "txt", "plain", "output", "json", "jsonl", "csv", "yaml", "toml",
                      "ini", "diff"})
MODES = frozenset({"parse-only"})

FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
MARKER = re.compile(r"^\s*<!--\s*doc-test:\s*(?P<mode>\S+?)\s*(?:\((?P<why>[^)]*)\))?\s*-->\s*$")


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its language tag ('' when missing), code, test mode."""
    path: str
    line: int
    language: str
    code: str
    mode: str = "run"

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def parse_markdown(text: str, path: str) -> tuple[list[Block], list[str]]:
    """The fenced blocks of one Markdown text, and its marking problems (as 'path:line: why')."""
    blocks, problems = [], []
    lines = text.splitlines()
    marker: tuple[int, str] | None = None  # (line, mode) of a marker awaiting its fence
    index = 0
    while index < len(lines):
        line, number = lines[index], index + 1
        found = MARKER.match(line)
        fence = FENCE.match(line)
        if found:
            if marker:
                problems.append(f"{path}:{marker[0]}: doc-test marker not followed by a fence")
            marker = (number, found["mode"])
            if found["mode"] not in MODES:
                problems.append(f"{path}:{number}: unknown doc-test mode {found['mode']!r} "
                                f"(known: {', '.join(sorted(MODES))})")
            elif not (found["why"] or "").strip():
                problems.append(f"{path}:{number}: say why the block cannot run: "
                                f"<!-- doc-test: {found['mode']} (needs ...) -->")
        elif "doc-test" in line and line.lstrip().startswith("<!--"):
            problems.append(f"{path}:{number}: malformed marker; write "
                            "<!-- doc-test: parse-only (why) -->")
        elif fence:
            char, width = fence["fence"][0], len(fence["fence"])
            closing = re.compile(rf"^\s*{re.escape(char)}{{{width},}}\s*$")
            end = index + 1
            while end < len(lines) and not closing.match(lines[end]):
                end += 1
            if end == len(lines):
                problems.append(f"{path}:{number}: fence never closed")
            indent = len(fence["indent"])
            # a fence indented in a list item: its lines lose that indentation only
            code = "\n".join(body[indent:] if not body[:indent].strip() else body.lstrip()
                             for body in lines[index + 1:end])
            info = fence["info"].split()
            blocks.append(Block(path, number, info[0].lower() if info else "", code + "\n",
                                marker[1] if marker else "run"))
            marker = None
            index = end
        elif line.strip() and marker:
            problems.append(f"{path}:{marker[0]}: doc-test marker not followed by a fence")
            marker = None
        index += 1
    if marker:
        problems.append(f"{path}:{marker[0]}: doc-test marker not followed by a fence")
    return blocks, problems


def collect() -> tuple[list[Block], list[str]]:
    blocks, problems = [], []
    for doc in DOC_FILES:
        found, wrong = parse_markdown(doc.read_text(), str(doc.relative_to(REPO)))
        blocks += found
        problems += wrong
    return blocks, problems


# --- shell: bash expands, a recorder stands in for every command ---------------------------

_PRELUDE = r"""
set -e
_doc_record() { printf '%s\0' "$#" "$@" >> "$DOC_TEST_LOG"; }
flax-captioner() { _doc_record flax-captioner "$@"; }
python() { _doc_record python "$@"; }
python3() { _doc_record python "$@"; }
pip() { _doc_record python -m pip "$@"; }
pip3() { _doc_record python -m pip "$@"; }
command_not_found_handle() { _doc_record "$@"; }
"""
# A parse-only block describes another machine: its `cd` targets need not exist here.
_PARSE_ONLY_PRELUDE = "cd() { :; }\n"


def expand_shell(code: str, cwd: Path, *, parse_only: bool) -> list[list[str]]:
    """The commands (argv lists) a shell block runs, expanded by bash in ``cwd``; none run.

    PATH is an empty directory, so anything that is not a bash builtin reaches the recorder.
    """
    bin_dir = cwd / ".doc-test-bin"
    bin_dir.mkdir(exist_ok=True)
    log = bin_dir / "commands"
    log.write_bytes(b"")
    script = _PRELUDE + (_PARSE_ONLY_PRELUDE if parse_only else "") + code
    result = subprocess.run(
        [shutil.which("bash") or "/bin/bash", "-c", script], cwd=cwd, capture_output=True,
        text=True, timeout=60,
        env={"PATH": str(bin_dir), "HOME": os.environ.get("HOME", str(cwd)),
             "DOC_TEST_LOG": str(log)})
    if result.returncode:
        raise AssertionError(f"bash could not expand the block: {result.stderr.strip()}")
    fields = log.read_bytes().decode().split("\0")[:-1]
    commands = []
    while fields:
        count = int(fields[0])
        commands.append(fields[1:1 + count])
        del fields[:1 + count]
    return commands


def launched(argv: list[str], cwd: Path) -> list[list[str]]:
    """The commands a launcher (``srun``, ``ssh``, ``gcloud ...``) runs: ``srun ...
    flax-captioner ARGS``, or shell code in an argument (``--command='... && flax-captioner
    ARGS'``), expanded as a parse-only block."""
    if "flax-captioner" in argv[1:]:
        return [argv[argv.index("flax-captioner", 1):]]
    found = []
    for arg in argv[1:]:
        if "flax-captioner" in arg and any(c.isspace() for c in arg):
            code = arg.split("=", 1)[1] if arg.startswith("-") and "=" in arg else arg
            found += expand_shell(code, cwd, parse_only=True)
    return found


def parse_cli(argv: list[str]) -> str | None:
    """None when ``flax-captioner ARGV`` parses (``--help`` included), else argparse's error."""
    from flax_captioner.cli import build_parser

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
            build_parser().parse_args(argv)
    except SystemExit as stop:
        if stop.code not in (0, None):
            return stderr.getvalue().strip().splitlines()[-1]
    return None


def pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10: pytest's own dependency
        import tomli as tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def check_pip(argv: list[str]) -> list[str]:
    """``python -m pip install ...``: requirement files and the extras of ``.[extra]`` exist."""
    extras = pyproject()["project"].get("optional-dependencies", {})
    problems = []
    for previous, arg in zip(argv, argv[1:]):
        if previous in ("-r", "--requirement") and not (REPO / arg).is_file():
            problems.append(f"requirement file {arg} does not exist")
        local = re.fullmatch(r"(\.[^\[]*)(?:\[(.*)\])?", arg)
        if local:
            if not (REPO / local[1] / "pyproject.toml").is_file():
                problems.append(f"{arg}: no pyproject.toml in {local[1]}")
            for extra in filter(None, (local[2] or "").split(",")):
                if extra.strip() not in extras:
                    problems.append(f"{arg}: pyproject.toml has no extra {extra.strip()!r}")
    return problems


def substitute_cli(argv: list[str]) -> list[str]:
    """``flax-captioner ARGV`` with the shapes model for the hub id and for a --model default."""
    from flax_captioner.cli import build_parser

    argv = [str(SHAPES) if arg == HUB_ID else arg.replace(f"={HUB_ID}", f"={SHAPES}")
            for arg in argv]
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            parsed = build_parser().parse_args(argv)
        except SystemExit:  # --help
            return argv
    if getattr(parsed, "model", None) == HUB_ID:
        argv = [argv[0], "--model", str(SHAPES), *argv[1:]]
    return argv


# --- the sandbox: a fresh clone plus the reader's files ------------------------------------

def make_sandbox(root: Path) -> Path:
    """A directory that reads like the repository root (its entries linked) plus USER_FILES."""
    from PIL import Image

    for entry in REPO.iterdir():
        if not entry.name.startswith(".") and not entry.name.endswith(".egg-info"):
            (root / entry.name).symlink_to(entry)
    for name, source in USER_FILES.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".txt"):
            target.write_text("".join(f"{SAMPLES / image}\n" for image in source))
        elif name.endswith(".tar"):
            with tarfile.open(target, "w") as shard:
                for key, image in enumerate(source):
                    shard.add(SAMPLES / image, arcname=f"{key:06d}{Path(image).suffix}")
        elif source == SHAPES.name:
            target.symlink_to(SHAPES)
        else:
            Image.open(SAMPLES / source).convert("RGB").save(target)  # format from the suffix
    return root


# --- running: a fresh interpreter per Python block, one worker for the shell blocks ---------

class _ShippedModel(ast.NodeTransformer):
    """The hub id -> the shapes model; ``X.from_pretrained()`` -> ``X.from_pretrained(SHAPES)``."""

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        return ast.copy_location(ast.Constant(str(SHAPES)), node) if node.value == HUB_ID else node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if (isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained"
                and not node.args and not node.keywords):
            node.args = [ast.copy_location(ast.Constant(str(SHAPES)), node)]
        return node


def _run_job(job: dict) -> int | str:
    if job["kind"] == "python":
        tree = ast.parse(job["source"], job["path"])
        ast.increment_lineno(tree, job["line"])  # tracebacks name the Markdown line
        tree = ast.fix_missing_locations(_ShippedModel().visit(tree))
        exec(compile(tree, job["path"], "exec"), {"__name__": "__main__"})
        return 0
    if job["kind"] == "cli":
        from flax_captioner.cli import main

        return main(job["argv"])
    process = subprocess.run([sys.executable, *job["argv"]], capture_output=True, text=True)
    sys.stdout.write(process.stdout)
    sys.stderr.write(process.stderr)
    return process.returncode


def runner(jobs_file: str, results_file: str) -> None:
    """Run the jobs in this interpreter, in order; write each one's exit code and output."""
    results = []
    for job in json.loads(Path(jobs_file).read_text()):
        stdout, stderr = io.StringIO(), io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = _run_job(job)
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
            except BaseException:  # noqa: BLE001 - reported to the test as a traceback
                traceback.print_exc()
                code = "traceback"
        results.append({"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(),
                        "seconds": round(time.perf_counter() - started, 1)})
    Path(results_file).write_text(json.dumps(results))


def serve() -> None:
    """The shell blocks' worker: runs job files named on stdin, answers 'done' on stdout."""
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray writes to fd 1 (C libraries) go to the log, not the protocol
    for line in sys.stdin:
        request = json.loads(line)
        os.chdir(request["cwd"])
        runner(request["jobs"], request["results"])
        protocol.write("done\n")
        protocol.flush()


def runner_env(cache: Path) -> dict[str, str]:
    """Offline, this checkout first, and one XLA compilation cache shared by every runner of
    the session (compiling the shapes model's search takes longer than running it)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                        os.environ.get("PYTHONPATH")])),
            "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def run_fresh(jobs: list[dict], sandbox: Path, env: dict[str, str]) -> list[dict]:
    """The jobs in a new interpreter started in ``sandbox``, as a reader would run them."""
    jobs_file, results_file = sandbox / ".doc-test-jobs.json", sandbox / ".doc-test-results.json"
    jobs_file.write_text(json.dumps(jobs))
    process = subprocess.run([sys.executable, __file__, str(jobs_file), str(results_file)],
                             cwd=sandbox, env=env, capture_output=True, text=True, timeout=600)
    assert results_file.exists(), f"the runner died:\n{process.stderr[-3000:]}"
    return json.loads(results_file.read_text())


class Worker:
    """One interpreter for every shell block's flax-captioner commands (each a ``cli.main``
    call, as the console script makes it), so JAX and transformers load once per session."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log, self.process = env, log, None

    def __call__(self, jobs: list[dict], sandbox: Path) -> list[dict]:
        if self.process is None or self.process.poll() is not None:
            with self.log.open("a") as log:
                self.process = subprocess.Popen(
                    [sys.executable, __file__, "--serve"], cwd=REPO, env=self.env, text=True,
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        jobs_file = sandbox / ".doc-test-jobs.json"
        results_file = sandbox / ".doc-test-results.json"
        jobs_file.write_text(json.dumps(jobs))
        self.process.stdin.write(json.dumps({"jobs": str(jobs_file), "results": str(results_file),
                                             "cwd": str(sandbox)}) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], 600)
        if not ready or self.process.stdout.readline() != "done\n":
            self.close()
            raise AssertionError(f"the worker died or hung:\n{self.log.read_text()[-3000:]}")
        return json.loads(results_file.read_text())

    def close(self) -> None:
        """Stops the worker: every result is on disk, and JAX's orderly exit takes seconds."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process.stdin.close()
            self.process.stdout.close()
            self.process = None


def caption_rows(argv: list[str], stdout: str, sandbox: Path) -> list[dict]:
    """The rows a finished ``flax-captioner caption`` run wrote (its --output, else stdout)."""
    from flax_captioner.cli import build_parser

    output = build_parser().parse_args(argv).output
    if output and output.endswith(".parquet"):
        import pyarrow.parquet

        rows = pyarrow.parquet.read_table(sandbox / output).to_pylist()
        # A Parquet row has every column; the ones a JSONL row would omit are null.
        return [{key: value for key, value in row.items() if value is not None} for row in rows]
    text = (sandbox / output).read_text() if output else stdout
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def describe(job: dict, result: dict) -> str:
    what = " ".join(job.get("argv", [])) or "the block"
    return (f"{what}: exit {result['code']} after {result['seconds']} s\n"
            f"--- stderr ---\n{result['stderr'][-3000:]}\n"
            f"--- stdout ---\n{result['stdout'][-1500:]}")


# --- checks of one block --------------------------------------------------------------------

def check_commands(commands: list[list[str]], sandbox: Path, *,
                   parse_only: bool) -> tuple[list[str], list[dict]]:
    """The problems of a block's recorded commands, and the jobs that run them."""
    problems, jobs = [], []
    for argv in commands:
        command = " ".join(argv)
        if argv[0] == "python" and argv[1:3] == ["-m", "pip"]:
            problems += [f"`{command}`: {why}" for why in check_pip(argv)]
        elif argv[0] == "python" and argv[1:3] == ["-m", "pytest"]:
            pass  # the CI line is checked by test_ci_runs_the_readme_test_line
        elif argv[0] == "python" and argv[1:2] == ["-m"] and argv[2:3] and (
                argv[2].split(".")[0] == "scripts"):
            problems += [f"`{command}`: {why}" for why in check_scripts([argv[2]])]
            if not parse_only:
                jobs.append({"kind": "process", "argv": argv[1:]})
        elif argv[0] == "python" and len(argv) > 1 and argv[1].startswith("scripts/"):
            problems.append(f"`{command}`: the scripts are a package; run "
                            f"`python -m {script_module(argv[1])}` from the repository root")
        elif argv[0] == "python":
            if not parse_only:
                jobs.append({"kind": "process", "argv": argv[1:]})
        elif argv[0] == "flax-captioner":
            error = parse_cli(argv[1:])
            if error:
                problems.append(f"`{command}` does not parse: {error}")
            elif not parse_only:
                jobs.append({"kind": "cli", "argv": substitute_cli(argv[1:])})
        elif parse_only:
            inner, _ = check_commands(launched(argv, sandbox), sandbox, parse_only=True)
            problems += [f"{problem} (launched by `{argv[0]}`)" for problem in inner]
        else:
            problems.append(f"`{command}` cannot run in the tests; mark the block "
                            "<!-- doc-test: parse-only (why) --> if it needs another machine")
    return problems, jobs


def check_shell(block: Block, sandbox: Path,
                run: Callable[[list[dict], Path], list[dict]]) -> list[str]:
    """The block's problems; runs its flax-captioner and python commands unless parse-only."""
    commands = expand_shell(block.code, sandbox, parse_only=block.mode == "parse-only")
    problems, jobs = check_commands(commands, sandbox, parse_only=block.mode == "parse-only")
    if problems or not jobs:
        return problems
    for job, result in zip(jobs, run(jobs, sandbox)):
        if result["code"] != 0 or "Traceback (most recent call last)" in result["stderr"]:
            problems.append(describe(job, result))
        elif job["kind"] == "cli" and job["argv"][0] == "caption":
            rows = caption_rows(job["argv"], result["stdout"], sandbox)
            failed = [row for row in rows if "error" in row or not row.get("caption")]
            if not rows or failed:
                problems.append(f"{' '.join(job['argv'])}: {len(rows)} rows, failed: {failed}")
    return problems


def _imported_names(tree: ast.Module) -> dict[str, object]:
    """The objects a block imports from flax_captioner, by the name the block binds."""
    names: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flax_captioner"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                names[alias.asname or alias.name] = getattr(module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("flax_captioner"):
                    module = importlib.import_module(alias.name)
                    # `import a.b as c` binds a.b to c; `import a.b` binds a
                    names[alias.asname or "flax_captioner"] = (
                        module if alias.asname else importlib.import_module("flax_captioner"))
    return names


def _resolve(node: ast.AST, names: dict[str, object],
             instances: dict[str, type]) -> object | None:
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.Attribute):
        if isinstance(node.value, ast.Name) and node.value.id in instances:
            method = getattr(instances[node.value.id], node.attr, None)
            # an instance method called on an instance: bind self
            return method.__get__(object()) if inspect.isfunction(method) else method
        owner = _resolve(node.value, names, instances)
        return getattr(owner, node.attr, None) if owner is not None else None
    return None


def check_python_statically(code: str, block: Block) -> list[str]:
    """Compiles; flax_captioner imports resolve; calls of what they import bind to the
    signatures (also methods of a variable assigned from ``Class(...)`` or a classmethod)."""
    try:
        tree = ast.parse(code, block.path)
    except SyntaxError as error:
        return [f"line {block.line + (error.lineno or 0)}: {error.msg}"]
    ast.increment_lineno(tree, block.line)
    try:
        names = _imported_names(tree)
    except (ImportError, AttributeError) as error:
        return [f"import fails: {error}"]
    instances: dict[str, type] = {}
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            made = _resolve(node.value.func, names, instances)
            cls = made if inspect.isclass(made) else getattr(made, "__self__", None)
            if inspect.isclass(cls):
                instances.update({target.id: cls for target in node.targets
                                  if isinstance(target, ast.Name)})
        if not isinstance(node, ast.Call) or any(
                isinstance(arg, ast.Starred) for arg in node.args) or any(
                keyword.arg is None for keyword in node.keywords):
            continue
        target = _resolve(node.func, names, instances)
        if target is None or not callable(target):
            continue
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):
            continue
        try:
            signature.bind(*node.args, **{keyword.arg: None for keyword in node.keywords})
        except TypeError as error:
            problems.append(f"line {node.lineno}: {ast.unparse(node.func)}(...): {error}")
    return problems


def check_python(block: Block, sandbox: Path, env: dict[str, str]) -> list[str]:
    if block.mode == "parse-only":
        return check_python_statically(block.code, block)
    job = {"kind": "python", "source": block.code, "path": block.path, "line": block.line}
    [result] = run_fresh([job], sandbox, env)
    return [describe(job, result)] if result["code"] != 0 else []


def script_module(path: str) -> str:
    """``scripts/x.py`` or ``scripts/x/`` -> ``scripts.x``."""
    return path.removesuffix(".py").rstrip("/").replace("/", ".")


def answer_help(modules: list[str]) -> None:
    """Runs each ``python -m MODULE --help`` in this interpreter (started in the repository
    root with it on ``PYTHONPATH``, as ``python -m`` there has it); prints 'DOC-TEST MODULE
    CODE'."""
    for module in modules:
        sys.argv = [module, "--help"]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code: object = 0
        except SystemExit as stop:
            code = stop.code or 0
        except BaseException:  # noqa: BLE001 - reported to the test
            code = "a traceback: " + traceback.format_exc(limit=-1).replace("\n", " ")
        print("\nDOC-TEST", module, code, flush=True)


def check_scripts(modules: Iterable[str]) -> list[str]:
    """Each module ``scripts.X`` exists and ``python -m scripts.X --help`` exits 0 (one
    interpreter for all)."""
    modules = sorted(set(modules))

    def exists(module: str) -> bool:
        path = REPO / module.replace(".", "/")
        return path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()

    present = [module for module in modules if exists(module)]
    problems = [f"{module} does not exist" for module in modules if module not in present]
    if present:
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        result = subprocess.run([sys.executable, __file__, "--help-of", *present], cwd=REPO,
                                text=True, capture_output=True, timeout=300,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path})
        codes = dict(re.findall(r"^DOC-TEST (\S+) (.+)$", result.stdout, re.M))
        problems += [f"`python -m {module} --help` exits "
                     f"{codes.get(module, result.stderr[-1500:])}"
                     for module in present if codes.get(module) != "0"]
    return problems


# --- the tests ------------------------------------------------------------------------------

import pytest  # noqa: E402 - the runner above needs no pytest

BLOCKS, MARKING_PROBLEMS = collect()
CODE_BLOCKS = [block for block in BLOCKS if block.language not in NOT_CODE]


@pytest.fixture(scope="session")
def env(tmp_path_factory) -> dict[str, str]:
    return runner_env(tmp_path_factory.mktemp("jax-cache"))


@pytest.fixture(scope="session")
def worker(env, tmp_path_factory) -> Iterable[Worker]:
    worker = Worker(env, tmp_path_factory.mktemp("worker") / "log")
    yield worker
    worker.close()


@pytest.mark.parametrize("block", CODE_BLOCKS, ids=[block.where for block in CODE_BLOCKS])
def test_block(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if not block.language:
        pytest.fail(f"{block.where}: fence has no language tag; use ```text for non-code",
                    pytrace=False)
    language = LANGUAGES.get(block.language)
    if language is None:
        pytest.fail(f"{block.where}: unknown language {block.language!r}; runnable: "
                    f"{sorted(LANGUAGES)}, not code: {sorted(NOT_CODE)}", pytrace=False)
    sandbox = make_sandbox(tmp_path)
    if language == "python":
        problems = check_python(block, sandbox, request.getfixturevalue("env"))
    else:  # the worker starts only when a block has something to run
        problems = check_shell(block, sandbox,
                               lambda jobs, cwd: request.getfixturevalue("worker")(jobs, cwd))
    if problems:
        pytest.fail(f"{block.where} ({block.mode}):\n" + "\n".join(problems), pytrace=False)


def test_markers_sit_right_before_fences() -> None:
    assert not MARKING_PROBLEMS, "\n".join(MARKING_PROBLEMS)


def test_ci_runs_the_readme_test_line() -> None:
    """The README says its "Run the tests" line is exactly what CI runs: every .ci/run line
    that runs pytest appears, as written, in a README shell block."""
    ci_lines = [line.strip() for line in CI_SCRIPT.read_text().splitlines()
                if "pytest" in line and not line.lstrip().startswith("#")]
    assert ci_lines, f"{CI_SCRIPT} runs no pytest line"
    readme_lines = {line.strip() for block in BLOCKS
                    if block.path == "README.md" and LANGUAGES.get(block.language) == "shell"
                    for line in block.code.replace("\\\n", " ").splitlines()}
    for line in ci_lines:
        assert line in readme_lines, f"README.md shows no shell line equal to .ci/run's {line!r}"


def test_console_script_is_what_the_blocks_run() -> None:
    """The worker runs ``flax_captioner.cli.main(argv)``: what ``flax-captioner`` runs (its
    entry point ``cli.run`` only adds a process-wide import choice for ``caption``)."""
    assert pyproject()["project"]["scripts"]["flax-captioner"] == "flax_captioner.cli:run"


def test_scripts_named_in_docs_exist_and_answer_help() -> None:
    """``python -m scripts.X`` and the files ``scripts/X.py`` the docs name."""
    texts = [doc.read_text() for doc in DOC_FILES]
    named = {match for text in texts  # module names are lower case; NAME is a placeholder
             for match in re.findall(r"\bscripts(?:\.[a-z_][a-z0-9_]*)+", text)}
    named |= {script_module(match) for text in texts
              for match in re.findall(r"\bscripts/[\w/]+\.py\b", text)}
    problems = check_scripts(named)
    assert not problems, "\n".join(problems)


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a Markdown text's headings: the title in lower case, links
    reduced to their text, characters other than letters, digits, ``-``, ``_`` and spaces
    dropped, spaces turned into hyphens; a repeated anchor gets ``-1``, ``-2``, ...
    Lines inside fenced blocks are not headings."""
    anchors: set[str] = set()
    fence: str | None = None
    for line in text.splitlines():
        opening = re.match(r"^\s*(`{3,}|~{3,})", line)
        if opening:
            if fence is None:
                fence = opening[1]
            elif opening[1].startswith(fence) and not line.strip().strip(fence[0]):
                fence = None
            continue
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fence is None and heading:
            title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading[1])
            anchor = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
            unique, count = anchor, 0
            while unique in anchors:
                count += 1
                unique = f"{anchor}-{count}"
            anchors.add(unique)
    return anchors


def link_problems(doc: Path) -> list[str]:
    """Relative links of ``doc`` whose file does not exist, or whose ``#anchor`` names no
    heading of the Markdown file it points to."""
    problems = []
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        for target in re.findall(r"\]\(([^)\s]*)\)", line):
            if "://" in target or target.startswith("mailto:"):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path) if path else doc
            where = f"{doc.relative_to(REPO)}:{number}"
            if not file.exists():
                problems.append(f"{where}: no {path}")
            elif anchor and file.suffix == ".md" and anchor not in heading_anchors(
                    file.read_text()):
                problems.append(f"{where}: no heading #{anchor} in {file.relative_to(REPO)}")
    return problems


def test_relative_links_resolve() -> None:
    problems = [problem for doc in DOC_FILES for problem in link_problems(doc)]
    assert not problems, "\n".join(problems)


def readme_module_map() -> list[str]:
    """The modules the README's module map lists: the ```text block that starts with
    ``flax_captioner/``, one entry per line indented two spaces (``a.py, b.py   what``)."""
    blocks, _ = parse_markdown((REPO / "README.md").read_text(), "README.md")
    [module_map] = [block for block in blocks if block.code.startswith("flax_captioner/\n")]
    names = []
    for line in module_map.code.splitlines()[1:]:
        entry = re.match(r"  (\w+\.py(?:, \w+\.py)*)(?:\s|$)", line)
        if entry:
            names += entry[1].split(", ")
    return names


def test_readme_module_map_lists_the_package_modules() -> None:
    """The README's module map names every module of the package once, and nothing else."""
    listed = readme_module_map()
    present = {path.name for path in (REPO / "flax_captioner").glob("*.py")}
    twice = sorted({name for name in listed if listed.count(name) > 1})
    missing = sorted(present - set(listed))
    absent = sorted(set(listed) - present)
    assert not (twice or missing or absent), (
        f"README.md's module map: not listed {missing}; listed but not in flax_captioner/ "
        f"{absent}; listed twice {twice}")


def test_public_names_import() -> None:
    import flax_captioner
    from flax_captioner import errors

    expected = {"Captioner", "GenerationSettings", "GenerationOutput", "run_pipeline",
                "CaptionerError", "DataError", "OutputError", "ModelLoadError", "ImageReadError"}
    assert expected <= set(flax_captioner.__all__)
    namespace: dict[str, object] = {}
    exec("from flax_captioner import *", namespace)
    assert set(flax_captioner.__all__) <= set(namespace)
    for name in ("CaptionerError", "DataError", "OutputError", "ModelLoadError",
                 "ImageReadError"):
        assert namespace[name] is getattr(errors, name)
        assert issubclass(namespace[name], errors.CaptionerError)
    assert inspect.isclass(namespace["Captioner"])
    assert callable(namespace["Captioner"].from_pretrained)
    assert callable(namespace["run_pipeline"])
    assert dataclasses.is_dataclass(namespace["GenerationSettings"])
    with pytest.raises(AttributeError, match="no attribute"):
        flax_captioner.NotAPublicName  # noqa: B018


# --- the harness fails where it should ------------------------------------------------------

def test_harness_flags_untagged_fences_and_stray_markers() -> None:
    text = ("<!-- doc-test: parse-only (needs the hub) -->\n\n```bash\nflax-captioner --help\n```\n"
            "<!-- doc-test: parse-only (why) -->\nsome prose\n```\nplain\n```\n"
            "<!-- doc-test: sometimes -->\n```python\nif True:\n    pass\n```\n"
            "  ~~~~sh\n  <!-- doc-test: parse-only -->\n    echo\n  ~~~~\n")
    blocks, problems = parse_markdown(text, "X.md")
    assert [(block.line, block.language, block.mode) for block in blocks] == [
        (3, "bash", "parse-only"), (8, "", "run"), (12, "python", "sometimes"),
        (16, "sh", "run")]
    assert blocks[2].code == "if True:\n    pass\n"
    assert blocks[3].code == "<!-- doc-test: parse-only -->\n  echo\n"  # inside: not a marker
    assert problems == ["X.md:6: doc-test marker not followed by a fence",
                        "X.md:11: unknown doc-test mode 'sometimes' (known: parse-only)"]


def test_harness_checks_links_and_anchors_as_github_makes_them(tmp_path: Path,
                                                              monkeypatch) -> None:
    text = ("# Performance: `scripts/x.py`\n## Runs 5 and 6, 2026-12-04\n```bash\n# not one\n```\n"
            "## The feed's own cost (2026-12-04)\n## Runs 5 and 6, 2026-12-04\n"
            "### See [the docs](b.md) ###\n")
    assert heading_anchors(text) == {
        "performance-scriptsxpy", "runs-5-and-6-2026-12-04", "the-feeds-own-cost-2026-12-04",
        "runs-5-and-6-2026-12-04-1", "see-the-docs"}
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "a.md").write_text(text + "[ok](#runs-5-and-6-2026-12-04-1) [ok](b.md#top)\n"
                                   "[bad](#nowhere) [bad](b.md#gone) [bad](c.md) [web](https://x)\n")
    (tmp_path / "b.md").write_text("# Top\n")
    assert link_problems(tmp_path / "a.md") == [
        "a.md:10: no heading #nowhere in a.md", "a.md:10: no heading #gone in b.md",
        "a.md:10: no c.md"]


def test_harness_expands_like_bash_and_finds_launched_commands(tmp_path: Path) -> None:
    (tmp_path / "a.png").touch()
    (tmp_path / "b.png").touch()
    code = ("python -m pip install -e '.[test]' && flax-captioner caption *.png \\\n"
            "    -o 'my out.jsonl'  # comment\n"
            "CUDA_VISIBLE_DEVICES=0 srun -n 2 flax-captioner caption x --bogus\n"
            "gcloud ssh --command='cd nowhere && flax-captioner merge y'\n")
    commands = expand_shell(code, tmp_path, parse_only=True)
    assert commands == [
        ["python", "-m", "pip", "install", "-e", ".[test]"],
        ["flax-captioner", "caption", "a.png", "b.png", "-o", "my out.jsonl"],
        ["srun", "-n", "2", "flax-captioner", "caption", "x", "--bogus"],
        ["gcloud", "ssh", "--command=cd nowhere && flax-captioner merge y"]]
    assert launched(commands[2], tmp_path) == [["flax-captioner", "caption", "x", "--bogus"]]
    assert launched(commands[3], tmp_path) == [["flax-captioner", "merge", "y"]]


def test_harness_rejects_what_cannot_run_or_parse(tmp_path: Path) -> None:
    unmarked = Block("X.md", 7, "bash", "gcloud compute tpus list\n")
    never = lambda jobs, cwd: pytest.fail("nothing here may run")  # noqa: E731
    assert "cannot run" in check_shell(unmarked, tmp_path, never)[0]
    marked = Block("X.md", 9, "bash", "srun flax-captioner caption a --num-beams x\n"
                   "python -m pip install -r missing.txt '.[nope]'\n", "parse-only")
    problems = check_shell(marked, tmp_path, never)
    assert "invalid int value: 'x'" in problems[0]
    assert "missing.txt does not exist" in problems[1]
    assert "no extra 'nope'" in problems[2]
    code = ("from flax_captioner import CaptionOptions, run_pipeline\n"
            "from flax_captioner.captioner import Captioner\n"
            "c = Captioner.from_pretrained('m', no_such_option=1)\n"
            "d = Captioner.from_pretrained('m')\n"
            "d.preprocess(['a.png'], CaptionOptions(), ['b.png'])\n"
            "run_pipeline(['x'], 'y', CaptionOptions(batch_size=2), d)\n")
    problems = check_python_statically(code, Block("X.md", 20, "python", code, "parse-only"))
    assert [problem.split(":")[0] for problem in problems] == ["line 23", "line 25"], problems
    assert check_python_statically("import os\nos.getcwd(", Block("X.md", 1, "python", ""))


def test_harness_fails_a_command_that_fails(tmp_path: Path, worker: Worker) -> None:
    block = Block("X.md", 3, "bash",
                  "flax-captioner caption img.jpg --num-beams 2 --num-return-sequences 3\n")
    [problem] = check_shell(block, make_sandbox(tmp_path), worker)
    assert problem.startswith(f"caption --model {SHAPES} img.jpg --num-beams 2"), problem
    assert "exit 2" in problem and "num-return-sequences (3)" in problem, problem


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    elif sys.argv[1] == "--help-of":
        answer_help(sys.argv[2:])
    else:
        runner(sys.argv[1], sys.argv[2])
