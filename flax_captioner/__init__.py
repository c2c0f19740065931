"""flax-captioner: ViT-GPT2 image captioning in JAX/Flax with an XLA-compiled beam search."""

from flax_captioner.errors import CaptionerError, DataError, ImageReadError, ModelLoadError

__all__ = ["CaptionerError", "DataError", "ImageReadError", "ModelLoadError"]
