#!/bin/bash
# One call on the GPU machine: compiled kernel tests, all benchmarks, an Nsight Compute look.
#   WB_COMMIT=$(git rev-parse HEAD) bash benchmarks/run_device.sh      (writes under $OUT)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/wb_out}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv;
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  WB_KERNEL_TESTS_GPU=1 timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -m gpu tests/kernels \
    -p no:cacheprovider --maxfail=4 2>&1 | tail -60 > "$OUT/gpu_tests.txt"
  tail -5 "$OUT/gpu_tests.txt"
fi
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/bench_kernels.py --out "$OUT" ${BENCH_ARGS:-} \
  > "$OUT/bench_stdout.txt" 2>&1
tail -60 "$OUT/bench_stdout.txt"
if [ "${SKIP_NCU:-0}" != "1" ] && command -v ncu >/dev/null; then
  timeout "${NCU_TIMEOUT:-90}" ncu --clock-control none -k 'regex:sparse|gemv|gemm|Kernel' -c 16 \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,launch__grid_size,launch__registers_per_thread,launch__occupancy_limit_registers,lts__t_bytes.sum \
    python3 benchmarks/diagnostics/profile_kernels.py > "$OUT/ncu.txt" 2>&1
  grep -E "sparse|gemv|gemm|duration|dram__bytes|throughput|warps_active|grid_size|registers" "$OUT/ncu.txt" | head -150
fi
