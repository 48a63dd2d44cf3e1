#!/usr/bin/env bash
# Knowledge-CLIP vs CLIP on Fashion-MNIST × WordNet (docs/RESULTS.md "Knowledge-CLIP"), CPU, 2 ranks each.
#   bash bench/knowledge_fashion.sh [RUNS_DIR] [VARIANTS...]     (default: every variant below)
# Needs data/fashion (python tools/make_fashion_kg.py --out data/fashion); kclip_nolinks also data/fashion_nolinks
# (… --out data/fashion_nolinks --drop-class-links), kclip_lemmas data/fashion_lemmas (… --class-text lemmas).
#
# Protocol. Stage 1 trains plain CLIP on the pairs until class zero-shot has levelled off: it stands in for the
# pretrained CLIP that Knowledge-CLIP continues from, and is the KD teacher (its features are precomputed into
# the pair shards, method.kd_teacher=features). Every stage-2 variant starts from it, runs the same steps with the
# same batch and seed set, and differs only in its stream and objectives:
#   clip          pairs only
#   clip2x        clip with twice the batch (2 × 128 pairs): the compute-matched control of the 2x variants
#   clipxm        the Knowledge-CLIP stream (pairs + triplets, MIX), CLIP loss on the pairs and on the
#                 (image, "is an image of", text) facts as pairs; no graph objectives — the "more text" control
#   clipmix       the Knowledge-CLIP stream, CLIP loss on its pair rows only (≈ 47 %): the "fewer pairs" control
#   kclip         Knowledge-CLIP, every objective (E2E, E2R, G2E, KD, CLIP on pairs)
#   kclip_nofilter  kclip with E2E's in-batch answer filter off (method.e2e_filter=false): every other image of
#                 the class is a negative of (?, is an image of, class)
#   kclipxm       kclip + the cross-modal facts as pairs (method.cross_modal_pairs)
#   kclip_nolinks kclip on data/fashion_nolinks (make_fashion_kg.py --drop-class-links): the KG without the
#                 WordNet edges between two classes (T-shirt —is a→ shirt), the facts that contradict the labels
#   kclip_lemmas  kclip on data/fashion_lemmas (make_fashion_kg.py --class-text lemmas): each class entity is worded
#                 by its lemmas alone ("jersey, T-shirt, tee shirt"), without the gloss that names a sibling class
#   kclip_hidetext  kclip with method.e2e_hide=text: an (image, r, text) fact always hides the text, so E2E never
#                 retrieves an image and the image embeddings are left to the CLIP term
#   kclip_noimg   kclip with method.knowledge_image_grad=false: the triplets' images feed the knowledge objectives
#                 but get no gradient from them, so the image tower learns from the CLIP and KD pairs alone
#   kclip2x_noimg kclip_noimg with twice the batch (as kclip2x)
#   kclipadd      kclip with the triplets ON TOP of CLIP's exact pair rows: data.mix=batch, batch 2 × 128 = 64 pairs
#                 + 64 triplets per rank, the pairs shuffled as their own stream, so every step holds the very pair
#                 rows of clip_sN (same seed) — a paired comparison: the knowledge terms are the only difference
#   kclipadd_noimg  kclipadd with method.knowledge_image_grad=false
#   kclipadd_noimg_nokd  kclipadd_noimg without KD (method.kd_weight=0): is the frozen init holding the class back?
#   kclipadd_noimg_kdW  kclipadd_noimg with method.kd_weight=W
#   kclipadd_nokd kclipadd without KD, the knowledge gradient reaching the image tower
#   kclip_coolN   kclip with the knowledge objectives falling linearly to 0 over the last N steps
#                 (method.objective_cooldown_steps=N): the run ends on the CLIP term (and the stream) alone
#   kclip2x       kclip with twice the batch (2 × 128): the triplets come on top of about as many pair rows as
#                 CLIP's batch holds, instead of taking half of them
#   kclip_no_X    kclip without objective X (X = e2e, e2r, g2e, kd, clip: ablation)
#   kclipxm_no_X  kclipxm without objective X (ablation)
#   kclipxm_kdW   kclipxm with method.kd_weight=W (chosen on zeroshot_val, never on the test split)
#   kclip_gwW     kclip with the graph objectives' weights (E2E, E2R, G2E) at W (chosen on zeroshot_val)
#   kclipxm_online  kclipxm with the online teacher (fp32 on CPU) instead of precomputed features: its step time
# Env: STAGE1_STEPS (1500), STEPS (300), MIX (pair::triplet shard weights, 1::3 ≈ half the rows triplets).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/kclip}; shift || true
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
PY=.venv/bin/python
STAGE1_STEPS=${STAGE1_STEPS:-1500}
STEPS=${STEPS:-300}
MIX=${MIX:-1::3}
PAIRS='data/fashion/pairs/train/{000000..000054}.tar'
TRIPLETS='data/fashion/triplets/{000000..000015}.tar'
mkdir -p "$OUT"
launch() {  # name, overrides...
  local name=$1; shift
  [ -f "$OUT/$name/done.json" ] && return 0
  rm -rf "${OUT:?}/$name"
  .venv/bin/torchrun --nproc_per_node 2 --master_port $((29700 + RANDOM % 200)) -m kclip_ds.train \
    --config configs/demo_knowledge.yaml train.output_dir="$OUT/$name" train.progress_bar=false "$@" > "$OUT/$name.log" 2>&1
  grep '^{"final"' "$OUT/$name.log" > "$OUT/$name/done.json"
}
diagnose() {  # name: confusions and the many-label hypernym mAP of the final checkpoint -> RUN/diagnostics.json
  [ -f "$OUT/$1/diagnostics.json" ] || $PY bench/knowledge_diagnostics.py "$OUT/$1" --limit 10000 \
    --out "$OUT/$1/diagnostics.json" > "$OUT/$1/diagnostics.log" 2>&1
}
# Stage 1: plain CLIP on the pairs from scratch -> the shared init and the KD teacher.
if [ ! -f "$OUT/init_clip_openclip/open_clip_model.safetensors" ]; then
  launch init_clip method.name=clip train.max_steps="$STAGE1_STEPS" train.lr=1.0e-3 train.warmup_steps=30 \
    train.save_every=500 train.eval_every=500 data.train="$PAIRS" data.train_upsampling_factors= data.resampled=false
  $PY tools/convert_to_hf.py --run-dir "$OUT/init_clip" --out "$OUT/init_clip_openclip" --format open_clip
fi
INIT_FILE="$OUT/init_clip_openclip/open_clip_model.safetensors"
if [ ! -f "$OUT/pairs_teacher/manifest.json" ]; then
  $PY tools/precompute_teacher.py --input data/fashion/pairs/train --out "$OUT/pairs_teacher" --arch kclip-tiny \
    --pretrained "$INIT_FILE" --batch-size 250 --workers 2 > "$OUT/pairs_teacher.log" 2>&1
fi
STAGE2=("model.pretrained=$INIT_FILE" train.max_steps="$STEPS" train.lr=2.0e-4 train.warmup_steps=20 train.save_every=0)
ONLY_PAIRS=(data.train="$PAIRS" data.train_upsampling_factors=)
STREAM=(data.train="$OUT/pairs_teacher/{000000..000054}.tar::$TRIPLETS" data.train_upsampling_factors="$MIX"
        method.kd_teacher=features)
NOLINKS_STREAM=(data.train="$OUT/pairs_teacher/{000000..000054}.tar::${TRIPLETS/data\/fashion\//data/fashion_nolinks/}"
                data.train_upsampling_factors="$MIX" method.kd_teacher=features)
LEMMAS_STREAM=(data.train="$OUT/pairs_teacher/{000000..000054}.tar::${TRIPLETS/data\/fashion\//data/fashion_lemmas/}"
               data.train_upsampling_factors="$MIX" method.kd_teacher=features)
ADD_STREAM=(data.train="$OUT/pairs_teacher/{000000..000054}.tar::$TRIPLETS" data.train_upsampling_factors=1::1
            data.mix=batch data.batch_size=128 method.kd_teacher=features)
NO_GRAPH=(method.e2e_weight=0 method.e2r_weight=0 method.g2e_weight=0 method.kd_weight=0)
VARIANTS=${*:-"clip_s0 kclip_s0 kclipxm_s0 clip_s1 kclip_s1 kclipxm_s1 clip_s2 kclip_s2 kclipxm_s2 clipxm_s0
               kclipxm_no_e2e_s0 kclipxm_no_e2r_s0 kclipxm_no_g2e_s0 kclipxm_no_kd_s0 kclipxm_online_s0"}
for v in $VARIANTS; do
  seed=${v##*_s}
  case $v in
    clip_s*) launch "$v" "${STAGE2[@]}" "${ONLY_PAIRS[@]}" method.name=clip train.seed="$seed" ;;
    clip2x_s*) launch "$v" "${STAGE2[@]}" "${ONLY_PAIRS[@]}" method.name=clip train.seed="$seed" data.batch_size=128 ;;
    clipmix_s*) launch "$v" "${STAGE2[@]}" "${STREAM[@]}" "${NO_GRAPH[@]}" train.seed="$seed" ;;
    clipxm_s*) launch "$v" "${STAGE2[@]}" "${STREAM[@]}" "${NO_GRAPH[@]}" method.cross_modal_pairs=true train.seed="$seed" ;;
    kclip_s*) launch "$v" "${STAGE2[@]}" "${STREAM[@]}" train.seed="$seed" ;;
    kclip_nofilter_s*) launch "$v" "${STAGE2[@]}" "${STREAM[@]}" train.seed="$seed" method.e2e_filter=false ;;
    kclip_nolinks_s*) launch "$v" "${STAGE2[@]}" "${NOLINKS_STREAM[@]}" train.seed="$seed" ;;
    kclip_lemmas_s*) launch "$v" "${STAGE2[@]}" "${LEMMAS_STREAM[@]}" train.seed="$seed" ;;
    kclip_hidetext_s*) launch "$v" "${STAGE2[@]}" "${STREAM[@]}" train.seed="$seed" method.e2e_hide=text ;;
    kclip_cool*_s*) n=${v#kclip_cool}; n=${n%_s*}
                    launch "$v" "${STAGE2[@]}" "${STREAM[@]}" train.seed="$seed" method.objective_cooldown_steps="$n" ;;
    kclipadd_s*) launch "$v" "${STAGE2[@]}" "${ADD_STREAM[@]}" train.seed="$seed" ;;
    kclipadd_noimg_s*) launch "$v" "${STAGE2[@]}" "${ADD_STREAM[@]}" train.seed="$seed" method.knowledge_image_grad=false ;;
    kclipadd_noimg_nokd_s*) launch "$v" "${STAGE2[@]}" "${ADD_STREAM[@]}" train.seed="$seed" \
                              method.knowledge_image_grad=false method.kd_weight=0 ;;
    kclipadd_noimg_kd*_s*) kd=${v#kclipadd_noimg_kd}; kd=${kd%_s*}
                           launch "$v" "${STAGE2[@]}" "${ADD_STREAM[@]}" train.seed="$seed" \
                             method.knowledge_image_grad=false method.kd_weight="$kd" ;;
    kclipadd_nokd_s*) launch "$v" "${STAGE2[@]}" "${ADD_STREAM[@]}" train.seed="$seed" method.kd_weight=0 ;;
    kclip_noimg_s*) launch "$v" "${STAGE2[@]}" "${STREAM[@]}" train.seed="$seed" method.knowledge_image_grad=false ;;
    kclip2x_noimg_s*) launch "$v" "${STAGE2[@]}" "${STREAM[@]}" train.seed="$seed" data.batch_size=128 \
                        method.knowledge_image_grad=false ;;
    kclip2x_s*) launch "$v" "${STAGE2[@]}" "${STREAM[@]}" train.seed="$seed" data.batch_size=128 ;;
    kclip_no_*) objective=${v#kclip_no_}; objective=${objective%_s*}
                launch "$v" "${STAGE2[@]}" "${STREAM[@]}" train.seed="$seed" method."${objective}"_weight=0 ;;
    kclip_gw*_s*) w=${v#kclip_gw}; w=${w%_s*}
                  launch "$v" "${STAGE2[@]}" "${STREAM[@]}" train.seed="$seed" \
                    method.e2e_weight="$w" method.e2r_weight="$w" method.g2e_weight="$w" ;;
    kclipxm_no_*) objective=${v#kclipxm_no_}; objective=${objective%_s*}
                  launch "$v" "${STAGE2[@]}" "${STREAM[@]}" method.cross_modal_pairs=true train.seed="$seed" \
                    method."${objective}"_weight=0 ;;
    kclipxm_kd*_s*) kd=${v#kclipxm_kd}; kd=${kd%_s*}
                    launch "$v" "${STAGE2[@]}" "${STREAM[@]}" method.cross_modal_pairs=true train.seed="$seed" \
                      method.kd_weight="$kd" ;;
    kclipxm_online_s*) launch "$v" "${STAGE2[@]}" "${STREAM[@]}" method.cross_modal_pairs=true train.seed="$seed" \
                         method.kd_teacher=online ;;
    kclipxm_s*) launch "$v" "${STAGE2[@]}" "${STREAM[@]}" method.cross_modal_pairs=true train.seed="$seed" ;;
  esac
  diagnose "$v"
  echo "$v: $(tail -c 600 "$OUT/$v/done.json")"
done
