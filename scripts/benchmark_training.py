"""Training throughput and input wait, this tree against a baseline checkout, side by side.

Fine-tunes the shipped shapes captioner on a freshly rendered shapes dataset for a fixed
number of steps (images/s counted from the end of the first step, which compiles), alternating runs of this tree and of ``--baseline`` (a checkout of an older
commit, e.g. ``git worktree add /tmp/before b11d8f3``), each in its own process, and prints
images/s and the share of the run the training loop spent waiting for decoded images.

How the wait is measured: this tree's trainer reports it (``TrainResult.input_wait_seconds``:
the loop blocked on the feed). Older trees decoded each batch synchronously inside the loop
(``train_data.make_batch``), so there the wait is the time spent in that call.

Usage:
  python -m scripts.benchmark_training [--baseline DIR] [--steps 30] [--batch-size 64]
      [--repeats 2] [--images 2000] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from flax_captioner.testing import make_dataset
from scripts.common import REPO, SHAPES_MODEL, machine, rotated

WORKER = textwrap.dedent("""
    import json, sys, time
    data, model, output_dir, steps, batch_size = sys.argv[1:6]
    from flax_captioner import train_data
    from flax_captioner.train import Trainer, TrainConfig
    decode_seconds = 0.0
    if hasattr(train_data, "make_batch"):  # older trees: synchronous decoding in the loop
        make_batch = train_data.make_batch
        def timed_make_batch(*args, **kwargs):
            global decode_seconds
            started = time.perf_counter()
            try:
                return make_batch(*args, **kwargs)
            finally:
                decode_seconds += time.perf_counter() - started
        train_data.make_batch = timed_make_batch
    steps, batch_size = int(steps), int(batch_size)
    config = TrainConfig(train_file=data, model=model, output_dir=output_dir,
                         batch_size=batch_size, max_steps=steps + 1, stop_at_step=steps,
                         learning_rate=1e-4, save_every=10**6, progress=False)
    trainer = Trainer(config)
    step_fn, compiled_at = trainer.train_step_fn, []
    def timed_step(*args, **kwargs):  # jit compiles during the first call, then runs async
        outputs = step_fn(*args, **kwargs)
        compiled_at.append(compiled_at[-1] if compiled_at else time.perf_counter())
        return outputs
    trainer.train_step_fn = timed_step
    started = time.perf_counter()
    result = trainer.run()
    finished = time.perf_counter()
    wait = getattr(result, "input_wait_seconds", None)
    print(json.dumps({"seconds": finished - started, "images": steps * batch_size,
                      "steady_seconds": finished - compiled_at[0],
                      "steady_images": (steps - 1) * batch_size,
                      "input_wait_seconds": decode_seconds if wait is None else wait}))
""")


def run_worker(tree: Path, data: Path, output_dir: Path, steps: int, batch_size: int) -> dict:
    """One training run of ``tree``'s trainer in its own process; its timings."""
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [sys.executable, "-c", WORKER, str(data), str(SHAPES_MODEL), str(output_dir),
         str(steps), str(batch_size)],
        capture_output=True, text=True, env=env, cwd=tree, check=False)
    if done.returncode:
        sys.exit(f"benchmark_training: worker for {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="checkout of the tree to compare with")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--work", type=Path, default=None, help="work directory [a temp dir]")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="benchmark-training-"))
    data = make_dataset(work / "data", train=args.images, validation=0, seed=1)["train"]
    trees = [("this tree", REPO)] + ([("baseline", args.baseline.resolve())]
                                     if args.baseline else [])
    results: dict[str, list[dict]] = {name: [] for name, _ in trees}
    for repeat in range(args.repeats):
        # Take turns: the machine's speed drifts within minutes.
        for name, tree in rotated(trees, repeat):
            output_dir = work / f"run-{name.replace(' ', '-')}-{repeat}"
            results[name].append(run_worker(tree, data, output_dir, args.steps,
                                            args.batch_size))
            last = results[name][-1]
            print(f"  {name} #{repeat + 1}: "
                  f"{last['steady_images'] / last['steady_seconds']:.1f} img/s after the "
                  f"first step, waited {last['input_wait_seconds']:.1f} of "
                  f"{last['seconds']:.1f} s", file=sys.stderr)

    print(f"\nTraining, shapes model, batch {args.batch_size}, {args.steps} steps, "
          f"{args.repeats} alternating runs each; {machine()}\n")
    print("| tree | images/s after the first step | whole run | waited for input |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        steady = (sum(run["steady_images"] for run in runs)
                  / sum(run["steady_seconds"] for run in runs))
        seconds = sum(run["seconds"] for run in runs)
        wait = sum(run["input_wait_seconds"] for run in runs)
        print(f"| {name} | {steady:.1f} | {seconds:.1f} s | {wait:.1f} s "
              f"({100 * wait / seconds:.0f}% of the run) |")


if __name__ == "__main__":
    main()
