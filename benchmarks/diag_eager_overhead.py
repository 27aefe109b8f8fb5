import time, torch, sys
sys.path.insert(0, ".")
import workbench as wb
from workbench import kernels as K
dev = "cuda"
torch.manual_seed(0)
d, f = 4096, 16384
w = torch.randn(f, d, device=dev, dtype=torch.bfloat16) * 0.02
b = torch.randn(d, device=dev, dtype=torch.bfloat16)
a = torch.relu(torch.randn(1, f, device=dev) - 1.28).to(torch.bfloat16)
lin = torch.nn.Linear(f, d, device=dev, dtype=torch.bfloat16)
def host(fn, n=300):
    for _ in range(20): fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    t1 = time.perf_counter(); torch.cuda.synchronize(); t2 = time.perf_counter()
    return (t1 - t) / n * 1e6, (t2 - t) / n * 1e6
for name, fn in [("cublas linear", lambda: lin(a)),
                 ("sparse_down", lambda: K.sparse_down(a, w, backend="triton")),
                 ("sparse_down bias", lambda: K.sparse_down(a, w, bias=b, backend="triton")),
                 ("sparse_down nopdl", lambda: K.sparse_down(a, w, backend="triton", config={"pdl": False})),
                 ]:
    print(name, "host us/call %.1f, wall us/call %.1f" % host(fn))
import cProfile, pstats
pr = cProfile.Profile(); pr.enable()
for _ in range(200): K.sparse_down(a, w, bias=b, backend="triton")
pr.disable(); torch.cuda.synchronize()
pstats.Stats(pr).sort_stats("tottime").print_stats(12)
