#!/bin/bash
# GPU benchmark, image part: Fashion-MNIST on the GPU. Phase 1 (alone, timed): time-to-94% of resnet_tiny recipes.
# Phase 2 (4 processes at once, accuracy only): candidate CPU recipes, since accuracy does not depend on the device.
set -u
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
[ -n "${SKIP_PIP:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NNFORGE_CACHE=/tmp/nncache MPLBACKEND=Agg
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
${PY:-python3} -c "import torch, pydantic; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(), 'pydantic', pydantic.__version__)"
echo "cpus $(nproc)"
FM=${FM:-/tmp/fm}
${PY:-python3} -m nnforge.data.fashion_mnist $FM --source ${FM_SOURCE:-.devcarry/img} ${LIMIT:+--limit-per-class $LIMIT} || exit 1
el "PNG tree written"
timeout ${P1_TIMEOUT:-240} ${PY:-python3} benchmarks/train_speed.py --data $FM to-accuracy --out /tmp/tta --json $OUT/tta.json ${TTA_ARGS:-} 2>&1 | tee $OUT/tta.log
el "phase 1 done"
cands=("epochs=7" "epochs=7;weight_decay=0.05" "epochs=7;batch_size=512;lr=0.006" "epochs=6;model_args=width=24"
       "epochs=7;model_args=width=24;weight_decay=0.05" "epochs=6;weight_decay=0.05" "epochs=8"
       "epochs=7;lr=0.005;weight_decay=0.05" "epochs=7;crop_pad=2;weight_decay=0.05")
for seed in 0 1; do
  for half in 0 1; do
    sel=(); for i in "${!cands[@]}"; do [ $(( i % 2 )) -eq $half ] && sel+=("${cands[$i]}"); done
    timeout ${P2_TIMEOUT:-180} ${PY:-python3} benchmarks/train_speed.py --data $FM to-accuracy --recipes --no-warmup --seed $seed \
      --out /tmp/cand --custom "${sel[@]}" > $OUT/cand_s${seed}_${half}.log 2>&1 &
  done
done
wait
el "phase 2 done"
grep -h "test 0" $OUT/cand_*.log
