#!/bin/bash
# One device call for the probe measurements of issues 24 and 25 (routing, recurrent state):
# the GPU correctness tests of the CUDA-only paths, then the two benchmarks. Writes under $OUT.
#   device run: bash benchmarks/run_probes_device.sh            (about 6 minutes on an H100)
# Copy $OUT/routing.json and $OUT/state.json to benchmarks/results/ (routing_<gpu>_<date>.json,
# state_<gpu>_<date>.json, replacing the current files) and set their "commit" field by hand:
# the device copy of the repository carries a stale commit.
#   PARTS="tests routing" bash benchmarks/run_probes_device.sh      (a subset; default all three)
set -u
PARTS=${PARTS:-tests routing state}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/wb_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
# RoutingProbe CUDA graphs == eager; StateProbe host linear algebra == CUDA eigvalsh
[[ $PARTS == *tests* ]] && WB_KERNEL_TESTS_GPU=1 timeout 120 python3 -m pytest -q -m gpu tests/capture/test_gpu.py \
  -k "routing_probe_cuda_graphs or host_linalg" -p no:cacheprovider > "$OUT/gpu_tests.txt" 2>&1
[[ $PARTS == *tests* ]] && tail -3 "$OUT/gpu_tests.txt"
if [[ $PARTS == *routing* ]]; then
# routing probe cost: eager batched (default), no token sample, CUDA graphs
timeout 150 python3 benchmarks/bench_routing.py --part gpu --out "$OUT/routing.json" > "$OUT/bench_routing.txt" 2>&1
python3 -c "import json; g = json.load(open('$OUT/routing.json'))['gpu']; print([(r['mode'], round(r['overhead'], 4)) for r in g['rows']], g['errors'])"
# where the routing probe's time goes, if it misses 1.05x (profiler tables, host syncs per router call)
if python3 -c "import json, sys; sys.exit(min(r['overhead'] for r in json.load(open('$OUT/routing.json'))['gpu']['rows']) <= 1.05)"; then
  timeout 90 python3 benchmarks/diagnostics/profile_probes.py --part routing > "$OUT/profile_routing.txt" 2>&1
fi
fi
if [[ $PARTS == *state* ]]; then
# state probe: 370M Mamba-2 shape, 64k vs 8k tokens, torch path
timeout 300 python3 benchmarks/bench_state.py --device cuda --model random-370m --tokens 65536 --ref-tokens 8192 \
  --repeats 1 --out "$OUT" > "$OUT/bench_state.txt" 2>&1
tail -3 "$OUT/bench_state.txt"
fi
