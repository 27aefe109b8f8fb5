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
    model = tiny()
    layer = model.model.decoder.layers[0]
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    for name, fn in (("fc1", layer.fc1), ("relu(fc1)", lambda v: layer.activation_fn(layer.fc1(v))),
                     ("fc2(relu(fc1))", lambda v: layer.fc2(layer.activation_fn(layer.fc1(v))))):
        e, g = fn(x), graphed(fn, x)
        print(f"{name:16s} eager vs graph replay: max |diff| {float((e.float() - g.float()).abs().max()):.3e}, "
              f"equal {torch.equal(e, g)}")
    with wb.accelerate(model, mode="chunk", backend="triton", call_graphs=False):
        sp = layer.fc1
        a = layer.activation_fn(layer.fc1.up_module(x)) if hasattr(sp, "up_module") else None
        y_k = sp(x)
    with torch.no_grad():
        y_d = layer.fc2(layer.activation_fn(layer.fc1(x)))
        y64 = (a.double() @ layer.fc2.weight.double().t() + layer.fc2.bias.double())
    print(f"8 tokens: kernel vs cuBLAS max |diff| {float((y_k.float() - y_d.float()).abs().max()):.3e}; vs fp64 rel "
          f"kernel {float((y_k.double() - y64).norm() / y64.norm()):.2e}, cuBLAS {float((y_d.double() - y64).norm() / y64.norm()):.2e}")


if __name__ == "__main__":
    main()
