"""Why the tiny-OPT chunk-mode GPU test flips one top-1 of 40 (tests/accel/test_gpu.py,
test_plain_ffn_triton_matches_dense[chunk-opt]): the same measure() with and without per-call graphs,
and each FFN piece of an 8-token call, eager against replayed from a CUDA graph.

    PYTHONPATH=$PWD python3 benchmarks/diag_plain_chunk.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers as tf  # noqa: E402

import workbench as wb  # noqa: E402


def tiny():
    torch.manual_seed(7)
    cfg = tf.OPTConfig(vocab_size=512, hidden_size=256, ffn_dim=1024, num_hidden_layers=4, num_attention_heads=4,
                       max_position_embeddings=128, word_embed_proj_dim=256, bos_token_id=0, eos_token_id=1,
                       pad_token_id=1)
    return tf.OPTForCausalLM(cfg).to("cuda", torch.bfloat16).eval()


def graphed(fn, x):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = fn(x)
    g.replay()
    torch.cuda.synchronize()
    return y


@torch.no_grad()
def main():
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(8)).cuda()
    for mode in ("exact", "chunk"):
        for cg in (True, False):
            model = tiny()
            with wb.accelerate(model, mode=mode, backend="triton", call_graphs=cg) as h:
                m = h.measure(ids, reps=1, warmup=0)
            print(mode, f"call_graphs={cg}", {k: m.summary[k] for k in ("logits_rel_rms", "top1_agreement",
                                                                        "top1_agreement_model_dtype_logits")})
    # the same measure with the v20 composition (a shared activation module keeps fc2 -> SparseDown)
    for cg in (True, False):
        model = tiny()
        layers = model.model.decoder.layers
        for layer in layers[1:]:
            layer.activation_fn = layers[0].activation_fn
        with wb.accelerate(model, mode="chunk", backend="triton", call_graphs=cg) as h:
            kinds = sorted({type(layer.fc2).__name__ for layer in layers})
            m = h.measure(ids, reps=1, warmup=0)
        print("chunk, composed", kinds, f"call_graphs={cg}", {k: m.summary[k] for k in ("logits_rel_rms",
                                                                                        "top1_agreement")})
    # one layer, 8 tokens: the new module against the composition, bit for bit
    model = tiny()
    layer = model.model.decoder.layers[0]
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    for name, fn in (("fc1", layer.fc1), ("relu(fc1)", lambda v: layer.activation_fn(layer.fc1(v)))):
        e, g = fn(x), graphed(fn, x)
        print(f"{name:16s} eager vs graph replay equal {torch.equal(e, g)}")
    fc2 = layer.fc2
    a = layer.activation_fn(layer.fc1(x))
    y_d = fc2(a)
    with wb.accelerate(model, mode="chunk", backend="triton", call_graphs=False):
        sp = layer.fc1
        y_new = layer.fc2(layer.activation_fn(sp(x)))
        y_comp = wb.kernels.sparse_down(a, fc2.weight.t(), bias=fc2.bias, config={"dense_fraction": 0.6})
        a_in = sp.act_module(sp.up_module(x))
    y64 = a.double() @ fc2.weight.double().t() + fc2.bias.double()
    print(f"8 tokens: a equal {torch.equal(a, a_in)}; new vs composed equal {torch.equal(y_new, y_comp)}, "
          f"max |diff| {float((y_new.float() - y_comp.float()).abs().max()):.3e}; rel to fp64: new "
          f"{float((y_new.double() - y64).norm() / y64.norm()):.2e}, composed {float((y_comp.double() - y64).norm() / y64.norm()):.2e}, "
          f"cuBLAS {float((y_d.double() - y64).norm() / y64.norm()):.2e}; union active "
          f"{float((a != 0).any(0).float().mean()):.2f}")

if __name__ == "__main__":
    main()
