"""Model loading (hub id, local directory, zoo:NAME) and the workbench's own architectures."""

from workbench.models import blockffn  # noqa: F401  (registers BlockFFN with the Auto classes)
from workbench.models.loading import load_model, load_tokenizer

__all__ = ["load_model", "load_tokenizer"]
