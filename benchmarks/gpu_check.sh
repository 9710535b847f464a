#!/usr/bin/env bash
# Everything a session with a GPU should check and time, as one command (sized for about 8 minutes
# on an H100/H200, inside the 10-minute limit of one device call):
#
#   OUT=gpu-out PEAK=989 bash benchmarks/gpu_check.sh      # PEAK: the card's dense bf16 TFLOP/s
#
# 1. the fast test suite on the GPU machine (its CUDA-only tests run there: augmentations against
#    torchvision on the device, probes, diffusion CPU/GPU agreement);
# 2. the main job on CUDA (device-resident data, bf16, then compiled), a few epochs;
# 3. training throughput of the paper-size HybViT and supervised ViT, fast path against eager fp32.
# Uses the python3 that holds PyTorch and runs genrep from src/ (no install needed).
set -uo pipefail
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}
PEAK=${PEAK:-989}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

timeout 180 python3 -m pytest -q -x -m "not slow" -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/tests.txt"

RUNS=$(mktemp -d)
timeout 90 python3 -m genrep.cli run --out "$RUNS/eager" --train.epochs 10 --train.progress false 2>&1 \
  | tail -12 | tee "$OUT/run-cuda.txt"
timeout 120 python3 -m genrep.cli run --out "$RUNS/compiled" --train.epochs 10 --train.progress false \
  --train.compile true 2>&1 | tail -12 | tee "$OUT/run-cuda-compiled.txt"

timeout 240 python3 benchmarks/throughput.py --recipe hybvit-cifar10 --batch-sizes 128,1024,4096 \
  --peak-tflops "$PEAK" --json "$OUT/hybvit-cifar10.json" 2>&1 | tee "$OUT/hybvit-cifar10.txt"
timeout 120 python3 benchmarks/throughput.py --recipe supervised-cifar10 --batch-sizes 128,4096 \
  --peak-tflops "$PEAK" --json "$OUT/supervised-cifar10.json" 2>&1 | tee "$OUT/supervised-cifar10.txt"
