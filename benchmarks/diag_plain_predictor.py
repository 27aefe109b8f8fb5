"""Where the time of OPT's predictor-mode FFN goes: each piece inside CUDA graph replays.

    PYTHONPATH=$PWD python3 benchmarks/diag_plain_predictor.py

One FFN of the OPT-6.7B shape (4096x16384, bf16; fc1 biases set as for bench_decode_plain's
predictor rows: nearly every unit active, so fc2 reads the predicted rows), a random width-1024
predictor with 90 % predicted off, one token. Each piece is timed with
triton.testing.do_bench_cudagraph over 4 layers' weights in turn (more than the 50 MB L2 between
two uses of one layer), per layer: the dense FFN (fc1, ReLU, fc2: cuBLAS), the predictor's two
GEMVs, the predicted up rows (gated_up with the 0/1 gate), the bias, ReLU, the sparse down
projection, and the whole swapped path (SparsePredictedUp + ReLU + SparseDown, graphs off), with
the bytes each reads and the bandwidth that implies.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from triton.testing import do_bench_cudagraph  # noqa: E402

import workbench as wb  # noqa: E402
from benchmarks.bench_decode_plain import SHAPE, all_active, build, sparsify  # noqa: E402

K = wb.kernels


@torch.no_grad()
def main():
    n = 4
    gen = torch.Generator().manual_seed(2)
    model = build(n, "cuda")
    calib = torch.randint(0, SHAPE["vocab"], (1, 128), generator=gen).cuda()
    _, preds = sparsify(model, calib, 0.9, 1024)
    all_active(model, calib)  # as bench_decode_plain's predictor rows: fc2 reads the predicted rows
    layers = model.model.decoder.layers
    xs = [torch.randn(1, SHAPE["hidden"], device="cuda", dtype=torch.bfloat16) for _ in range(n)]
    ps = [{k: v.to(torch.bfloat16) for k, v in preds[f"model.decoder.layers.{i}"].items()} for i in range(n)]
    wd = [layer.fc2.weight.t().contiguous() for layer in layers]  # the kernels' layout (a copy, for timing)
    hs = [torch.relu(xs[i] @ ps[i]["w1"].t() + ps[i]["b1"]) for i in range(n)]
    gates = [((hs[i] @ ps[i]["w2"].t() + ps[i]["b2"]) > 0).to(torch.bfloat16) for i in range(n)]
    us = [K.gated_up(xs[i], gates[i], layers[i].fc1.weight, activation="relu") for i in range(n)]
    acts = [torch.relu(torch.addcmul(us[i], gates[i], layers[i].fc1.bias)) for i in range(n)]
    print(f"predicted on: {float(torch.stack(gates).mean()):.3f}; zeros reaching fc2: "
          f"{1 - float((torch.stack(acts) != 0).float().mean()):.3f}")
    h = wb.accelerate(model, mode="predictor", predictors=preds, backend="triton", call_graphs=False).off()

    def per_layer(fn):
        def run():
            for i in range(n):
                fn(i)
        return do_bench_cudagraph(run, rep=200) * 1e3 / n

    d, f, w = SHAPE["hidden"], SHAPE["ff"], 1024
    mb = 1e-6 * 2
    pieces = [
        ("dense FFN (cuBLAS fc1, ReLU, fc2)", lambda i: layers[i].fc2(torch.relu(layers[i].fc1(xs[i]))), 2 * d * f * mb),
        ("predictor layer 1 (gemv, ReLU)", lambda i: K.gemv(xs[i], ps[i]["w1"], ps[i]["b1"], relu=True), w * d * mb),
        ("predictor layer 2 (gemv) + mask", lambda i: (K.gemv(hs[i], ps[i]["w2"], ps[i]["b2"]) > 0).to(torch.bfloat16),
         f * w * mb),
        ("gated_up, predicted rows", lambda i: K.gated_up(xs[i], gates[i], layers[i].fc1.weight, activation="relu"),
         0.1 * d * f * mb),
        ("bias on predicted rows + ReLU", lambda i: torch.relu(torch.addcmul(us[i], gates[i], layers[i].fc1.bias)), 0.0),
        ("sparse_down (fc2, bias)", lambda i: K.sparse_down(acts[i], wd[i], bias=layers[i].fc2.bias), 0.1 * d * f * mb),
    ]
    for name, fn, mbytes in pieces:
        us_ = per_layer(fn)
        bw = f", {mbytes / us_:.2f} TB/s on {mbytes:.1f} MB" if mbytes else ""
        print(f"{name:38s} {us_:7.1f} us{bw}")
    h.on()
    f1 = [layer.fc1 for layer in layers]
    f2 = [layer.fc2 for layer in layers]
    us_ = per_layer(lambda i: f2[i](torch.relu(f1[i](xs[i]))))
    print(f"{'whole swapped path (graphs off)':38s} {us_:7.1f} us, bytes {(w * d + f * w + 0.2 * d * f) * mb:.1f} MB")
    h.off()


if __name__ == "__main__":
    main()
