"""Constants the command line needs at parse time; this module imports nothing, so
``flax-captioner --help`` does not pay for JAX or transformers."""

DEFAULT_MODEL = "nlpconnect/vit-gpt2-image-captioning"
