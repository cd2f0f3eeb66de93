# Sourced by every sbatch template: run in the submit directory, inside the project's environment.
# RVG_CONDA_ENV=<name> activates that conda env, RVG_VENV=<dir> that virtualenv; with neither, the
# environment active at `sbatch` time is used (sbatch exports it by default).
cd "${SLURM_SUBMIT_DIR:-.}"
if [[ -n ${RVG_CONDA_ENV:-} ]]; then
    source "$(conda info --base)/etc/profile.d/conda.sh"
    conda activate "$RVG_CONDA_ENV"
elif [[ -n ${RVG_VENV:-} ]]; then
    source "$RVG_VENV/bin/activate"
fi
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # compute nodes rarely reach the hub: models come from the cache
echo "[$(date -Is)] job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname): $(command -v python)"

# run_study.py --slurm submits a study's arm x seed runs as one array job of a stage template:
# task i takes its options from the --config file named on line i + 1 of $RVG_ARRAY_CONFIGS.
if [[ -n ${RVG_ARRAY_CONFIGS:-} ]]; then
    set -- --config "$(sed -n "$(( ${SLURM_ARRAY_TASK_ID:?} + 1 ))p" "$RVG_ARRAY_CONFIGS")" "$@"
fi

# A requeued job (SLURM_RESTART_COUNT > 0) continues its run instead of refusing to overwrite it.
# Arrays that may be empty expand as ${a[@]+"${a[@]}"}: bash < 4.4 (old cluster images ship 4.2)
# calls a bare "${a[@]}" of an empty array unbound under set -u.
resume=()
if (( ${SLURM_RESTART_COUNT:-0} > 0 )); then
    resume=(--resume)
fi

# srun reports a task killed by signal N as 128 + N. SIGUSR1 (sent before the time limit) or SIGTERM
# (preemption) ended a step that keeps no state of its own: requeue, and the rerun resumes. Stage 3
# exits with 128 + SIGUSR1 itself after checkpointing when it could not run scontrol (a container
# without SLURM's tools): this shell, on the host, requeues the job for it.
requeue_if_signalled() {
    local status=$1
    if (( status == 128 + 10 || status == 128 + 15 )); then
        echo "step ended by signal $((status - 128)): requeueing job ${SLURM_JOB_ID}"
        scontrol requeue "${SLURM_JOB_ID}"
    fi
    return "$status"
}
