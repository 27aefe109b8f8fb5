"""Sparse decode kernels (Triton) with torch references, imported as ``workbench.kernels``.

Public functions (all take ``backend=None | "triton" | "torch"`` and ``config=None``):

- sparse_down(a, w_down_t, bias)                         P1: input-sparse down projection
- gated_up(x, gate, w_up, activation, threshold)         P2: up rows where act(gate) != 0
- gate_up_predicted(x, logits, w_gate, w_up, ...)        P3: gate+up rows where logit > 0
- sparse_ffn(x, w_gate, w_up, w_down_t, ...)             P2: whole FFN, gate dense
- sparse_ffn_predicted(x, w_gate, w_up, w_down_t, w_pred1, w_pred2, ...)   P3
- plain_ffn_predicted(x, w_up, w_down_t, w_pred1, w_pred2, b_up, b_down, ...)   P3, plain FFN (OPT)
- chunk_ffn(x, w_gate, w_up, w_down_t, ..., dense_fraction)   P4: union over a chunk of tokens
- moe_blocks(x, w_router, norm_weight, w_up, w_down_t, eps)   P4: ReLU-routed MoE blocks
- predictor_logits(x, w1, w2, b1, b2), router_scores(x, w_router, norm_weight, eps)
- gemv(x, w, bias, relu)                                  dense one-token GEMV (the dense parts)

Dispatch (one place, ``_api._dispatch``): Triton when every tensor is on CUDA (or TRITON_INTERPRET=1)
and triton imports, else the torch reference; backend="triton" that cannot run raises KernelError.
Weight layouts: see ``workbench.kernels.layout``.
Launches: on sm_90+ the decode kernels use programmatic dependent launch (``_common.use_pdl``;
``config={"pdl": False}`` or ``WB_PDL=0`` turns it off). 2..64 tokens take the chunk path of
``chunk_ffn/gather.py`` (union list + gathered GEMMs) in sparse_ffn and chunk_ffn.
"""

# This folder is importable as a top-level ``kernels`` whenever the checkout's root is on sys.path
# (Python started in the checkout, pytest's rootdir). That name belongs to Hugging Face's
# `kernels` distribution, which transformers (a requirement since 5.2x) imports from its hub
# kernels integration; serving it this folder breaks every model import. So under that name this
# file hands the import over to the installed distribution and defines nothing of its own.
if __name__ == "kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys
    import types as _types

    def _hand_over() -> None:
        root = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))
        path = [p for p in _sys.path if _os.path.realpath(_os.path.abspath(p or ".")) != root]
        spec = _machinery.PathFinder.find_spec("kernels", path)
        if spec is not None:
            module = _util.module_from_spec(spec)
            _sys.modules["kernels"] = module
            spec.loader.exec_module(module)
            return
        # Not installed: a stand-in with no __file__ and no __version__, which transformers' check
        # reads as "not installed" (older transformers import the name to look for a version).
        message = (
            "Hugging Face's `kernels` package is not installed; the `kernels` folder found on "
            f"sys.path ({_os.path.dirname(_os.path.realpath(__file__))}) holds workbench's Triton "
            "kernels, imported as `workbench.kernels`. Install it with `pip install kernels`."
        )

        def __getattr__(name: str):
            raise AttributeError(message)

        stand_in = _types.ModuleType("kernels", message)
        stand_in.__getattr__ = __getattr__
        _sys.modules["kernels"] = stand_in

    _hand_over()
else:
    from ._api import *  # noqa: F403
    from ._api import __all__  # noqa: F401
