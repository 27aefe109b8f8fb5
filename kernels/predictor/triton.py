"""Fast path of the predictor: inside `sparse_ffn_predicted` (kernels/sparse_ffn/triton.py) the two
layers of one token go through the Triton GEMV (kernels/dense_gemv, bias and ReLU fused into the
first), more tokens through cuBLAS. The logits are consumed by the row kernels (MODE 1) directly,
so no mask tensor is materialised. The public `predictor_logits` stays the torch reference: it
also serves fp32 calibration and the metrics.
"""

from .reference import default_width, predictor_logits

__all__ = ["default_width", "predictor_logits"]
