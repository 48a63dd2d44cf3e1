# Shared set-up of the kclip_ds sbatch templates (sourced, not run): environment, rendezvous, device.
#
# Knobs, each settable in the template or per job with `sbatch --export=ALL,NAME=value …`:
#   KCLIP_HOME     the kclip_ds checkout (default: the directory sbatch was run from)
#   KCLIP_VENV     python environment with kclip_ds installed (default: $KCLIP_HOME/.venv)
#   KCLIP_MODULES  environment modules to `module load` first, e.g. "cuda/12.4 nccl/2.21"
#   KCLIP_DEVICE   gpu (default) | cpu: CPU ranks over gloo (smoke tests, CI)
#   KCLIP_LAUNCH   a prefix for every task, e.g. "apptainer exec --nv /images/kclip.sif"
#   MASTER_PORT    rendezvous port (default: derived from the job id, stable across requeues)
# NCCL / network variables (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_DEBUG, …) travel with the job as they were
# at submission (sbatch exports the submitting environment by default).

KCLIP_HOME=${KCLIP_HOME:-${SLURM_SUBMIT_DIR:-$(pwd)}}
KCLIP_VENV=${KCLIP_VENV:-$KCLIP_HOME/.venv}
KCLIP_MODULES=${KCLIP_MODULES:-}
KCLIP_DEVICE=${KCLIP_DEVICE:-gpu}
KCLIP_LAUNCH=${KCLIP_LAUNCH:-}

cd "$KCLIP_HOME"
if [[ -n "$KCLIP_MODULES" ]]; then
    # shellcheck disable=SC2086
    module load $KCLIP_MODULES
fi
# shellcheck disable=SC1091
source "$KCLIP_VENV/bin/activate"

# Rendezvous: the first node of the allocation, at the address Slurm knows it by (NodeAddr, which is the
# host name on most sites), on a port that a requeued job (same id) finds again.
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
node_addr=$(scontrol show node "$first_node" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)
export MASTER_ADDR=${MASTER_ADDR:-${node_addr:-$first_node}}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
if [[ "$KCLIP_DEVICE" == cpu ]]; then
    export DS_ACCELERATOR=cpu
fi
