#!/usr/bin/env bash
# Submit the three stages as one chain and print their job ids: stage 2 starts once every stage-1
# array task has succeeded (afterok), stage 3 once stage 2 has; a failure cancels what depends on it.
#
#   slurm/pipeline.sh [--model_name M] [--task_name T] [--tag NAME] [--run_name NAME] [--shards N]
#                     [--out_dir DIR] [--stage1 "OPTIONS"] [--stage2 "OPTIONS"] [--stage3 "OPTIONS"]
#
# --stage1/2/3 add options to one stage (e.g. --stage3 "--softmask delta --sampler cosine"). Partition,
# account and QoS come from sbatch's own variables: SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_QOS.
set -euo pipefail
cd "$(dirname "$0")/.."

model=smollm2-135m task=countdown tag=pipeline run=pipeline shards=4 out=rollout_dump
stage1=() stage2=() stage3=()
while (( $# )); do
    case $1 in
        --model_name|--model-name) model=$2 ;;
        --task_name|--task-name) task=$2 ;;
        --tag) tag=$2 ;;
        --run_name|--run-name) run=$2 ;;
        --shards) shards=$2 ;;
        --out_dir|--out-dir) out=$2 ;;
        --stage1) read -ra stage1 <<<"$2" ;;
        --stage2) read -ra stage2 <<<"$2" ;;
        --stage3) read -ra stage3 <<<"$2" ;;
        -h|--help) sed -n '2,10s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "error: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift 2
done

# Where stage 1 will write, by the stage's own naming rules.
rollouts=$(python - "$out" "$task" "$model" "$tag" <<'PY'
import sys

from pipeline.artifacts import stage_dir
from pipeline.models import model_slug
from pipeline.tasks import task_slug

out, task, model, tag = sys.argv[1:]
print(stage_dir(out, task_slug(task), model_slug(model)) / f"rollouts_{tag}")
PY
)
importance=$(dirname "$rollouts")/importance_net
mkdir -p slurm/logs

submit() {  # sbatch ARGS... -> the new job's id
    local reply
    reply=$(sbatch "$@")
    [[ $reply =~ Submitted\ batch\ job\ ([0-9]+) ]] || { echo "error: sbatch said: $reply" >&2; exit 1; }
    echo "${BASH_REMATCH[1]}"
}

j1=$(submit --array=0-$((shards - 1)) slurm/stage1_rollouts.sbatch \
     --model_name "$model" --task_name "$task" --out_dir "$out" --tag "$tag" ${stage1[@]+"${stage1[@]}"})
j2=$(submit --dependency=afterok:"$j1" --kill-on-invalid-dep=yes slurm/stage2_importance.sbatch \
     --rollouts "$rollouts" --out_dir "$out" --run_name "$run" ${stage2[@]+"${stage2[@]}"})
j3=$(submit --dependency=afterok:"$j2" --kill-on-invalid-dep=yes slurm/stage3_grpo.sbatch \
     --model_name "$model" --task_name "$task" --importance_net "$importance/$run/export" --out_dir "$out" \
     --run_name "$run" ${stage3[@]+"${stage3[@]}"})

echo "stage 1 (rollouts, $shards array tasks): job $j1 -> $rollouts"
echo "stage 2 (importance net): job $j2 -> $importance/$run"
echo "stage 3 (GRPO): job $j3"
echo "watch: squeue --me; tail -f slurm/logs/rvg-rollouts-${j1}_*.out slurm/logs/rvg-importance-$j2.out" \
     "slurm/logs/rvg-grpo-$j3.out"
