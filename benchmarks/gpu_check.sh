#!/usr/bin/env bash
# Everything a session with a GPU checks and times, as one device call (about 7 minutes on an H100/H200):
#
#   OUT=gpu-out PEAK=989 bash benchmarks/gpu_check.sh      # PEAK: the card's dense bf16 TFLOP/s
#
# 1. the fast test suite on the GPU machine (its CUDA-only tests run there);
# 2. the main job on CUDA: hybvit-digits trained, probed, sampled and evaluated (every protocol but
#    fine-tuning) on the GPU, its eval.json and report kept;
# 3. training throughput of the paper-size HybViT and supervised ViT, fast path against eager fp32.
# Uses the python3 that holds PyTorch and runs genrep from src/; pure-Python dependencies the device
# may lack travel in gpu-deps/ (make gpu-deps).
set -uo pipefail
export PYTHONPATH="$PWD/src:$PWD/gpu-deps${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}
PEAK=${PEAK:-989}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchmetrics, torch_fidelity; print('torch', torch.__version__, torch.cuda.get_device_name(),
'torchmetrics', torchmetrics.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"

timeout 100 python3 -m pytest -q -x -m "not slow" -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/tests.txt"

RUNS=$(mktemp -d)
timeout 90 python3 -m genrep.cli run --out "$RUNS/hybvit" --train.progress false 2>&1 | tail -32 \
  | tee "$OUT/run-cuda.txt"
cp "$RUNS/hybvit/results/eval.json" "$OUT/eval-cuda.json" 2>/dev/null
cp "$RUNS/hybvit/report.html" "$OUT/report-cuda.html" 2>/dev/null

timeout 130 python3 benchmarks/throughput.py --recipe hybvit-cifar10 --batch-sizes 1024 --steps 10 --warmup 3 \
  --peak-tflops "$PEAK" --json "$OUT/hybvit-cifar10.json" 2>&1 | tail -8 | tee "$OUT/hybvit-cifar10.txt"
timeout 100 python3 benchmarks/throughput.py --recipe supervised-cifar10 --batch-sizes 1024 --steps 10 --warmup 3 \
  --peak-tflops "$PEAK" --json "$OUT/supervised-cifar10.json" 2>&1 | tail -8 | tee "$OUT/supervised-cifar10.txt"
