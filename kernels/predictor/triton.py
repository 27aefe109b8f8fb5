"""Fast path of the predictor: the two dense GEMVs through cuBLAS (torch.nn.functional.linear).

A custom kernel would move the same bytes; the predictor's mask is consumed by the row kernel
(sparse_ffn.triton MODE 1), which reads the logits directly, so no mask tensor is materialised.
"""

from .reference import default_width, predictor_logits

__all__ = ["default_width", "predictor_logits"]
