#!/bin/bash
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
WB_KERNEL_TESTS_GPU=1 timeout 60 python3 -m pytest -q -m gpu tests/capture/test_gpu.py -k routing_probe_cuda_graphs -p no:cacheprovider > $OUT/gpu_test.txt 2>&1; tail -3 $OUT/gpu_test.txt
timeout 70 python3 benchmarks/bench_routing.py --part gpu --rounds 4 --out $OUT/routing.json > $OUT/bench_routing.txt 2>&1; tail -2 $OUT/bench_routing.txt
python3 -c "import json;d=json.load(open('$OUT/routing.json'));g=d.get('gpu',d);print([(r['mode'],round(r['overhead'],4),round(r['baseline_ms'],2)) for r in g['rows']], g.get('probe_ops_per_router_call'))"
echo "t=$SECONDS"
timeout 100 python3 benchmarks/bench_state.py --device cuda --model random-370m --tokens 16384 --ref-tokens 4096 --repeats 1 --out $OUT > $OUT/bench_state.txt 2>&1; tail -4 $OUT/bench_state.txt; echo "t=$SECONDS"
