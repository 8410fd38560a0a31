#!/usr/bin/env bash
# The GPU benchmark, one prepared script for one GPU (an H200: under 8 minutes). Prints markdown tables:
#   1. bf16 training-step throughput of our gMLP-Ti and gMLP-S at 224 px against timm's, MFU against a matmul
#      measured in the same run, and torch.compile on/off (benchmarks/model_step.py);
#   2. a short single-GPU Lightning run of the default job (jobs/gmlp.yaml) with its images/s per epoch
#      (benchmarks/end_to_end.py).
#
#   bash benchmarks/gpu.sh [--data DIR]       # on the GPU machine; DIR defaults to ../shared/white-dogs
#   bash benchmarks/gpu.sh --cpu-smoke        # the same steps at toy sizes on the CPU (the test suite runs this)
#
# PYTHON selects the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
data=../shared/white-dogs
smoke=0
while (($#)); do
    case $1 in
        --cpu-smoke) smoke=1 ;;
        --data) data=${2:?--data needs a directory}; shift ;;
        *) echo "usage: bash benchmarks/gpu.sh [--data DIR] [--cpu-smoke]" >&2; exit 2 ;;
    esac
    shift
done

if ((smoke)); then
    "$python" benchmarks/model_step.py --device cpu --models gmlp-pico@32 --batch-sizes 4 --precisions fp32 \
        --steps 2 --warmup 1
    "$python" benchmarks/end_to_end.py --device cpu --data "$data" --quick
else
    "$python" -c "import torch, sys; torch.cuda.is_available() or sys.exit('benchmarks/gpu.sh: no CUDA device \
visible; on a CPU machine run it with --cpu-smoke')"
    "$python" benchmarks/model_step.py --device cuda --models gmlp-ti@224,gmlp-s@224 --batch-sizes 128,256 \
        --precisions bf16 --steps 20 --warmup 5 --compile
    "$python" benchmarks/end_to_end.py --device cuda --data "$data" --max-epochs 5
fi
