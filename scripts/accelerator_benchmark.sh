#!/usr/bin/env bash
# The one prepared accelerator benchmark (issue 10): on a machine with one GPU it runs in under
# 8 minutes and writes accelerator-benchmark.json, accelerator-benchmark.md and workers.log
# into $OUT (else ./accelerator-benchmark-results). Arguments go to
# python -m scripts.accelerator (--smoke, --parts, --budget-scale, --out).
#
# The GPU image ships transformers 5 (no Flax classes); this project needs transformers 4.x,
# so the carried wheels in .whl/ (transformers 4.57.6, tokenizers 0.22.x, huggingface_hub < 1,
# fetched as /work/.library/device/README.md says) are installed first, into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "no wheels in .whl/: using the installed transformers (needs 4.x for Flax)" >&2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python3 -m scripts.accelerator "$@"
