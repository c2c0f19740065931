#!/usr/bin/env bash
# The transformers 5 job: in a virtual environment of its own, the newest transformers 5 with
# huggingface_hub 1 and the newest JAX and Flax (PyTorch 2.13.0, CPU build, for the reference).
# Shows that `pip install -e .` keeps transformers 5, runs the README's caption command, then
# the tests of loading (every weight format), the modules, a few training steps, the interop
# refusal and the parity grid against this release's PyTorch `generate`; and, under Pillow 12
# (the main suite has 13), the device resize against Pillow's own (its pass order differs).
#
#   bash .ci/transformers5.sh                 # VENV5 (default .ci/.venv5) is made or reused
#
# transformers 5.25 and newer need huggingface_hub >= 2.4: under the hub 1 this job tests,
# pip resolves the newest 5.x that accepts it (docs/generation.md, "transformers releases").
set -euo pipefail
cd "$(dirname "$0")/.."

VENV5=${VENV5:-.ci/.venv5}
start=$SECONDS
[ -x "$VENV5/bin/python" ] || python3 -m venv "$VENV5"
py="$VENV5/bin/python"
# torch through a constraint, so no later resolve swaps in a multi-GB CUDA build.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" > "$constraints"
pip_install() { "$py" -m pip install --quiet --upgrade -c "$constraints" "$@"; }

pip_install torch==2.13.0
pip_install "transformers>=5" "huggingface_hub>=1,<2" jax flax pytest pytest-xdist \
  "pycocoevalcap>=1.2" "pillow<13"
pip_install -e .
"$py" - <<'EOF'
import importlib.metadata as md
names = ["transformers", "huggingface_hub", "tokenizers", "jax", "flax", "optax", "torch",
         "pillow", "flax-captioner"]
print("transformers5.sh: " + ", ".join(f"{name} {md.version(name)}" for name in names))
major = int(md.version("transformers").split(".")[0])
assert major >= 5, f"pip install -e . replaced transformers 5 by {md.version('transformers')}"
EOF
echo "transformers5.sh: environment ready in $((SECONDS - start)) s"

# The README's caption command, as a new user types it.
"$VENV5/bin/flax-captioner" caption examples/images --model examples/shapes-captioner

"$py" -m pytest -ra -p no:cacheprovider \
  tests/test_loading.py tests/test_modules.py tests/test_hf_flax.py tests/test_resize.py \
  "tests/test_docs.py::test_block" -k "not test_block or README" \
  "tests/test_train.py::test_one_train_step_lowers_the_loss_on_a_fixed_batch" \
  "tests/test_train.py::test_training_evaluates_and_exports" \
  "tests/test_train.py::test_exported_checkpoint_logits_match_in_pytorch"
"$py" -m pytest -ra -p no:cacheprovider tests/test_parity_generate.py \
  -k "captions_equal_pytorch_generate or new_processors_equal or trained_shapes_checkpoint"
echo "transformers5.sh: passed in $((SECONDS - start)) s"
