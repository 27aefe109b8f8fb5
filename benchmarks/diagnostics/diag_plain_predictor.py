"""Where the time of OPT's sparse FFN goes, each piece inside CUDA graph replays: exact mode and
predictor mode, the composed path of v20 (fc1 / fc2 swapped one by one) against the one-module
path (SparsePlainFFN) and its one-launch predictor kernel, plus that kernel's block shapes.

    PYTHONPATH=$PWD python3 benchmarks/diagnostics/diag_plain_predictor.py [--sweep]

One FFN of the OPT-6.7B shape (4096x16384, bf16; --fp16 for float16), one token, 4 layers' weights timed in turn with
triton.testing.do_bench_cudagraph (more than the 50 MB L2 between two uses of one layer), per
layer. Exact mode on the model sparsified as bench_decode_plain does (~90 % zeros after fc1's
ReLU). Predictor mode after `all_active` (as bench_decode_plain's predictor rows: nearly every
unit active, so fc2 reads the predicted rows) with a random width-1024 predictor, 90 % predicted
off. Each line gives the bytes the piece reads and the bandwidth that implies.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from triton.testing import do_bench_cudagraph  # noqa: E402

import workbench as wb  # noqa: E402
from benchmarks.bench_decode_plain import SHAPE, all_active, build, sparsify  # noqa: E402

K = wb.kernels


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="block shapes of the one-launch predictor kernel")
    ap.add_argument("--fp16", action="store_true", help="float16 weights (default bfloat16)")
    ap.add_argument("--smoke-cpu", action="store_true", help="tiny shape on the CPU (interpreter), timings meaningless")
    args = ap.parse_args()
    n, dev, width = 4, "cuda", 1024
    bench = do_bench_cudagraph
    if args.smoke_cpu:
        import time

        SHAPE.update(hidden=64, ff=256, heads=4, vocab=512)
        n, dev, width = 2, "cpu", 16

        def bench(run, rep):
            t0 = time.perf_counter()
            run()
            return (time.perf_counter() - t0) * 1e3
    dt = torch.float16 if args.fp16 else torch.bfloat16
    gen = torch.Generator().manual_seed(2)
    model = build(n, dev, dtype=dt)
    calib = torch.randint(0, SHAPE["vocab"], (1, 128), generator=gen).to(dev)
    _, preds = sparsify(model, calib, 0.9, width)
    layers = model.model.decoder.layers
    xs = [torch.randn(1, SHAPE["hidden"], device=dev, dtype=dt) for _ in range(n)]
    wd = [layer.fc2.weight.t().contiguous() for layer in layers]  # the kernels' layout (a copy, for timing)
    d, f, w = SHAPE["hidden"], SHAPE["ff"], width
    mb = 1e-6 * 2

    def per_layer(fn):
        def run():
            for i in range(n):
                fn(i)
        return bench(run, rep=200) * 1e3 / n

    def show(name, fn, mbytes):
        us_ = per_layer(fn)
        bw = f", {mbytes / us_:.2f} TB/s on {mbytes:.1f} MB" if mbytes else ""
        print(f"{name:52s} {us_:7.1f} us{bw}", flush=True)
        return us_

    def swapped(i):  # the model's own sequence, whatever is swapped in
        return layers[i].fc2(layers[i].activation_fn(layers[i].fc1(xs[i])))

    # -- exact mode ------------------------------------------------------------------------------
    acts = [torch.relu(layers[i].fc1(xs[i])) for i in range(n)]
    zeros = 1 - float((torch.stack(acts) != 0).float().mean())
    print(f"exact mode: zeros reaching fc2 {zeros:.3f}")
    show("dense FFN (cuBLAS fc1, ReLU, fc2)", lambda i: layers[i].fc2(torch.relu(layers[i].fc1(xs[i]))), 2 * d * f * mb)
    show("fc1 cuBLAS + ReLU", lambda i: torch.relu(layers[i].fc1(xs[i])), d * f * mb)
    show("fc1 Triton gemv (bias, ReLU fused)", lambda i: K.gemv(xs[i], layers[i].fc1.weight, layers[i].fc1.bias,
                                                               relu=True), d * f * mb)
    show("sparse_down (fc2, bias)", lambda i: K.sparse_down(acts[i], wd[i], bias=layers[i].fc2.bias),
         (1 - zeros) * d * f * mb)
    bytes_exact = (1 + (1 - zeros)) * d * f * mb
    for label in ("v20: SparseDown only", "SparsePlainFFN"):
        h = (_composed(model, "exact") if label.startswith("v20")
             else wb.accelerate(model, mode="exact", backend="triton", call_graphs=False))
        show(f"whole swapped path, exact ({label}, graphs off)", swapped, bytes_exact)
        h.off()

    # -- predictor mode --------------------------------------------------------------------------
    all_active(model, calib)
    ps = [{k: v.to(dt) for k, v in preds[f"model.decoder.layers.{i}"].items()} for i in range(n)]
    hs = [torch.relu(xs[i] @ ps[i]["w1"].t() + ps[i]["b1"]) for i in range(n)]
    gates = [((hs[i] @ ps[i]["w2"].t() + ps[i]["b2"]) > 0).to(dt) for i in range(n)]
    us = [K.gated_up(xs[i], gates[i], layers[i].fc1.weight, activation="relu") for i in range(n)]
    acts = [torch.relu(torch.addcmul(us[i], gates[i], layers[i].fc1.bias)) for i in range(n)]
    on = float(torch.stack(gates).mean())
    print(f"predictor mode: predicted on {on:.3f}; zeros reaching fc2 {1 - float((torch.stack(acts) != 0).float().mean()):.3f}")
    show("dense FFN (cuBLAS fc1, ReLU, fc2)", lambda i: layers[i].fc2(torch.relu(layers[i].fc1(xs[i]))), 2 * d * f * mb)
    show("predictor layer 1 (gemv, ReLU)", lambda i: K.gemv(xs[i], ps[i]["w1"], ps[i]["b1"], relu=True), w * d * mb)
    show("predictor layer 2 (gemv) + mask", lambda i: (K.gemv(hs[i], ps[i]["w2"], ps[i]["b2"]) > 0).to(dt),
         f * w * mb)
    show("gated_up, predicted rows", lambda i: K.gated_up(xs[i], gates[i], layers[i].fc1.weight, activation="relu"),
         on * d * f * mb)
    show("bias on predicted rows + ReLU", lambda i: torch.relu(torch.addcmul(us[i], gates[i], layers[i].fc1.bias)), 0.0)
    show("sparse_down (fc2, bias)", lambda i: K.sparse_down(acts[i], wd[i], bias=layers[i].fc2.bias), on * d * f * mb)
    pbytes = (w * d + f * w + 2 * on * d * f) * mb

    def fused(i, cfg=None):
        L, p = layers[i], ps[i]
        return K.plain_ffn_predicted(xs[i], L.fc1.weight, wd[i], p["w1"], p["w2"], b_up=L.fc1.bias, b_down=L.fc2.bias,
                                     b_pred1=p["b1"], b_pred2=p["b2"], config=cfg)

    ref = torch.cat([fused(i, {"updown": {}, "fuse_pred2": False}) for i in range(n)])
    got = torch.cat([fused(i) for i in range(n)])
    tr = torch.cat([K.plain_ffn_predicted(xs[i], layers[i].fc1.weight, wd[i], ps[i]["w1"], ps[i]["w2"],
                                          b_up=layers[i].fc1.bias, b_down=layers[i].fc2.bias, b_pred1=ps[i]["b1"],
                                          b_pred2=ps[i]["b2"], backend="torch") for i in range(n)])
    print(f"one-launch vs MODE 1 rel {float((got.float() - ref.float()).norm() / ref.float().norm()):.2e}, "
          f"vs the torch reference {float((got.float() - tr.float()).norm() / tr.float().norm()):.2e} "
          "(masks near zero may differ by the predictor's rounding)")
    show("plain_ffn_predicted (gemv + one launch, MODE 2)", fused, pbytes)
    show("plain_ffn_predicted, 2nd layer as gemv (MODE 1)", lambda i: fused(i, {"fuse_pred2": False}), pbytes)
    show("  its one launch alone (MODE 2)", lambda i: _updown_only(xs[i], hs[i], layers[i], wd[i], ps[i]),
         pbytes - w * d * mb)
    if args.sweep:
        for chunk in (8, 16, 32):
            for bk in (1, 2, 4):
                for warps in (2, 4, 8):
                    cfg = {"updown": dict(CHUNK=chunk, BK=bk, num_warps=warps, num_stages=1)}
                    show(f"  MODE 2 CHUNK {chunk} BK {bk} warps {warps}", lambda i, c=cfg: fused(i, c), pbytes)
    for label in ("v20: SparsePredictedUp + SparseDown", "SparsePlainFFN"):
        h = (_composed(model, "predictor", preds) if label.startswith("v20")
             else wb.accelerate(model, mode="predictor", predictors=preds, backend="triton", call_graphs=False))
        show(f"whole swapped path, predictor ({label}, graphs off)", swapped, pbytes)
        h.off()


def _updown_only(x, hid, layer, wd, p):
    from workbench.kernels.sparse_ffn.updown import updown

    return updown(x, hid, None, layer.fc1.weight, wd, mode=2, w_pred2=p["w2"], b_pred2=p["b2"], plain=True,
                  b_up=layer.fc1.bias, b_down=layer.fc2.bias)


def _composed(model, mode, preds=None):
    """The v20 composition (fc2 -> SparseDown, in predictor mode fc1 -> SparsePredictedUp; the model's
    activation stays): what accelerate does when the activation module is shared."""
    layers = model.model.decoder.layers
    shared = layers[0].activation_fn
    originals = [layer.activation_fn for layer in layers]
    for layer in layers:
        layer.activation_fn = shared
    try:
        h = wb.accelerate(model, mode=mode, backend="triton", call_graphs=False,
                          **({"predictors": preds} if preds else {}))
    finally:
        for layer, a in zip(layers, originals, strict=True):
            layer.activation_fn = a
    return h


if __name__ == "__main__":
    main()
