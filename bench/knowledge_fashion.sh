#!/usr/bin/env bash
# Knowledge-CLIP vs CLIP on Fashion-MNIST × WordNet (docs/RESULTS.md "Knowledge-CLIP"), CPU, 2 ranks each.
#   bash bench/knowledge_fashion.sh [RUNS_DIR] [VARIANTS...]     (default: every variant, seeds 0 1 2)
# Needs data/fashion (python tools/make_fashion_kg.py --out data/fashion) and the stage-1 CLIP below; every
# stage-2 variant starts from the same init, sees the same number of samples per step and runs the same steps.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/kclip}; shift || true
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
PY=.venv/bin/python
STEPS=${STEPS:-300}
launch() {  # name, overrides...
  local name=$1; shift
  [ -f "$OUT/$name/done.json" ] && return 0
  rm -rf "${OUT:?}/$name"
  .venv/bin/torchrun --nproc_per_node 2 --master_port $((29700 + RANDOM % 200)) -m kclip_ds.train \
    --config configs/demo_knowledge.yaml train.output_dir="$OUT/$name" train.progress_bar=false "$@" > "$OUT/$name.log" 2>&1
  grep '^{"final"' "$OUT/$name.log" > "$OUT/$name/done.json"
}
# Stage 1: plain CLIP on the pairs from scratch -> the shared init (and the KD teacher).
if [ ! -f "$OUT/init_clip_openclip/open_clip_model.safetensors" ]; then
  launch init_clip method.name=clip train.max_steps=400 train.lr=1.0e-3 train.warmup_steps=30 train.save_every=200 \
    data.train='data/fashion/pairs/train/{000000..000054}.tar' data.train_upsampling_factors= data.resampled=false
  $PY tools/convert_to_hf.py --run-dir "$OUT/init_clip" --out "$OUT/init_clip_openclip" --format open_clip
fi
INIT="model.pretrained=$OUT/init_clip_openclip/open_clip_model.safetensors"
STAGE2=("$INIT" train.max_steps=$STEPS train.lr=2.0e-4 train.warmup_steps=20 train.save_every=0)
PAIRS=(data.train='data/fashion/pairs/train/{000000..000054}.tar' data.train_upsampling_factors=)
VARIANTS=${*:-"kclip_s0 clip_s0 kclip_s1 clip_s1 kclip_s2 clip_s2 kclip_no_e2e_s0 kclip_no_e2r_s0 kclip_no_g2e_s0 kclip_no_kd_s0
               kclipxm_s0 kclipxm_s1 kclipxm_s2"}
for v in $VARIANTS; do
  seed=${v##*_s}
  case $v in
    clip_s*) launch "$v" "${STAGE2[@]}" "${PAIRS[@]}" method.name=clip train.seed="$seed" ;;
    kclip_no_*) objective=${v#kclip_no_}; objective=${objective%_s*}
                launch "$v" "${STAGE2[@]}" train.seed="$seed" method."${objective}"_weight=0 ;;
    kclip_s*) launch "$v" "${STAGE2[@]}" train.seed="$seed" ;;
    kclipxm_s*) launch "$v" "${STAGE2[@]}" train.seed="$seed" method.cross_modal_pairs=true ;;
  esac
  echo "$v: $(tail -c 600 "$OUT/$v/done.json")"
done
