"""flax-captioner: ViT-GPT2 image captioning in JAX/Flax with an XLA-compiled beam search.

The public names. The error classes import at once; the rest import JAX and transformers,
so they load on first use (PEP 562), which keeps ``flax-captioner --help`` fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from flax_captioner.errors import (CaptionerError, DataError, ImageReadError, ModelLoadError,
                                   NonFiniteLossError, OutputError, PipelineInterrupted,
                                   ProcessGroupError)

if TYPE_CHECKING:
    from flax_captioner.captioner import Captioner
    from flax_captioner.generator import GenerationOutput
    from flax_captioner.pipeline import PipelineStats, run_pipeline
    from flax_captioner.settings import GenerationSettings

# public name -> module that defines it
_LAZY = {
    "Captioner": "flax_captioner.captioner",
    "GenerationOutput": "flax_captioner.generator",
    "GenerationSettings": "flax_captioner.settings",
    "PipelineStats": "flax_captioner.pipeline",
    "run_pipeline": "flax_captioner.pipeline",
}

__all__ = ["Captioner", "CaptionerError", "DataError", "GenerationOutput", "GenerationSettings",
           "ImageReadError", "ModelLoadError", "NonFiniteLossError", "OutputError",
           "PipelineInterrupted", "PipelineStats", "ProcessGroupError", "run_pipeline"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flax_captioner' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
