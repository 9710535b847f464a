#!/usr/bin/env bash
# The two-process training run N times in a row while two busy loops keep both cores busy (a loaded CI machine),
# counting the ranks that abort at exit ("terminate called without an active exception") and the failed runs.
# Usage: bash benchmarks/teardown_stress.sh [N=30] [RECIPE=hybvit-digits]
set -uo pipefail
cd "$(dirname "$0")/.."
N=${1:-30}; RECIPE=${2:-hybvit-digits}
PY=${PYTHON:-.venv/bin/python}
work=$(mktemp -d "${TMPDIR:-/tmp}/genrep-teardown.XXXXXX")
for _ in 1 2; do "$PY" -c "while True: pass" & done
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT
aborts=0; failures=0
for i in $(seq "$N"); do
  port=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  OMP_NUM_THREADS=1 GENREP_METHODS= "$PY" -m torch.distributed.run --nnodes=1 --nproc_per_node=2 \
    --master_port="$port" --master_addr=127.0.0.1 -m genrep.cli pretrain --recipe "$RECIPE" --out "$work/run$i" \
    --data.image_size=8 --train.batch_size=32 --train.steps=4 --train.log_every=5 --train.ckpt_every=2 \
    --train.progress=false --train.device=cpu --optim.warmup_epochs=0.2 --model.dim=32 --model.depth=2 \
    --model.num_heads=2 > "$work/log$i" 2>&1
  rc=$?
  if grep -q "terminate called\|SIGABRT" "$work/log$i"; then aborts=$((aborts + 1)); cp "$work/log$i" "abort-$i.log"; fi
  if [ "$rc" -ne 0 ]; then failures=$((failures + 1)); fi
  rm -rf "$work/run$i"
  echo "run $i: exit $rc, aborts so far $aborts, failures so far $failures"
done
echo "teardown stress: $N runs of $RECIPE on 2 processes under load: $aborts aborts, $failures failed runs"
[ "$aborts" -eq 0 ] && [ "$failures" -eq 0 ]
