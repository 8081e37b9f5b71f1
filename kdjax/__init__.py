"""kdjax: response-primed knowledge distillation of LLMs in JAX / Flax NNX.

Public API:
  load_model(source, *, dtype="float32", ...) -> (model, config)   # HF dir, .gguf or kdjax checkpoint
  load_tokenizer(source) -> transformers tokenizer with its chat template
"""

__version__ = "0.1.0"


def load_model(source, **kwargs):
  from kdjax.models.checkpoint import load_model as _load_model
  return _load_model(source, **kwargs)


def load_tokenizer(source):
  from kdjax.models.checkpoint import load_tokenizer as _load_tokenizer
  return _load_tokenizer(source)


__all__ = ["load_model", "load_tokenizer"]
