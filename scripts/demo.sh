#!/usr/bin/env bash
# The whole pipeline on the embedded SmolLM2-135M, on CPU: paired dump -> importance net -> soft-masked GRPO.
# Rerunning resumes each stage instead of starting over. Override the root with OUT=...
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-rollout_dump}
MODEL=smollm2-135m
TASK=arithmetic
STAGE=$OUT/$TASK/$MODEL

echo "== stage 1: paired rollouts (16 prompts x 2 groups x 8 completions) =="
$PY generate_paired_rollouts.py --model_name $MODEL --task_name $TASK --levels 0,1 --num_prompts 16 \
    --groups_per_prompt 2 --group_size 8 --max_new_tokens 48 --prompts_per_chunk 4 --out_dir "$OUT" --tag demo

echo "== stage 2: importance network (frozen backbone + attention head) =="
RESUME2=$([ -f "$STAGE/importance_net/demo/checkpoints/last.ckpt" ] && echo --resume || true)
$PY train_importance_net.py --rollouts "$STAGE/rollouts_demo" --group_stats prompt --val_fraction 0.25 --max_epochs 8 \
    --per_device_train_batch_size 32 --run_name demo $RESUME2

echo "== stage 3: GRPO with --softmask delta under the gaussian curriculum =="
$PY train_grpo_softmask.py --model_name $MODEL --task_name $TASK --levels 0,1,2,3 \
    --importance_net "$STAGE/importance_net/demo/export" --softmask delta --sampler gaussian \
    --prompts_per_step 2 --group_size 8 --max_new_tokens 48 --max_steps 6 --lr 2e-6 \
    --eval_prompts 4 --eval_every 3 --save_every 3 --out_dir "$OUT" --run_name demo --resume

echo
echo "== artifacts =="
echo "stage 1 dump:        $STAGE/rollouts_demo/ (part-*.parquet, rollouts_metadata.json)"
echo "stage 2 run:         $STAGE/importance_net/demo/ (export/, metrics.csv, calibration.png, f_by_position.png, report.html)"
echo "stage 3 run:         $STAGE/grpo/demo/ (policy/, metrics.csv, eval.csv, samples.parquet, learning_curve.png, curriculum.png)"
