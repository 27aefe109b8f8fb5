"""Is a difference between two runs of chained predicted-mode layers PDL's doing, or mask flips
from the run-to-run order of fp32 split sums? Four chained sparse_ffn_predicted layers with a
random predictor (logits near 0), run eagerly several times with PDL off and with it on; prints
the relative difference of each run to the first PDL-off run.

    python3 benchmarks/diag_pdl_flip.py
"""

from __future__ import annotations

import torch
import workbench.kernels as K


def main():
    d, f, dt = 1024, 2816, torch.float16
    g = torch.Generator().manual_seed(0)

    def w(r, c):
        return (torch.randn(r, c, generator=g) * c**-0.5).to(dt).cuda()

    layers = [(w(f, d), w(f, d), w(f, d), w(256, d), w(f, 256)) for _ in range(4)]
    x0 = torch.randn(1, d, generator=g).to(dt).cuda()

    def chain(pdl):
        x = x0
        for wg, wu, wdt, w1, w2 in layers:
            cfg = {"gemv": {"pdl": pdl}, "updown": {"pdl": pdl}}
            x = K.sparse_ffn_predicted(x, wg, wu, wdt, w1, w2, config=cfg)
        return x.double()

    ref = chain(False)
    for pdl in (False, True):
        diffs = [((chain(pdl) - ref).norm() / ref.norm()).item() for _ in range(8)]
        print(f"pdl={pdl}: rel diff to the first PDL-off run: " + ", ".join(f"{v:.1e}" for v in diffs))


if __name__ == "__main__":
    main()
