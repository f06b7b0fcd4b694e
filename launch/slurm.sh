#!/usr/bin/env bash
# Multi-node GPU runs under SLURM: one JAX process per GPU (default) or one per node.
#
# Usage, from the repository root (WORKDIR on a filesystem every node sees):
#   one process per GPU (4 nodes x 8 GPUs = 32 processes):
#     sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 launch/slurm.sh \
#         vqlc/configs/imagenet_lc.py runs/lc --config.codebook.path=runs/cb/codebook.npy
#   one process per node, driving all its GPUs:
#     sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 launch/slurm.sh CONFIG WORKDIR ...
#   inside an allocation (salloc ...): the same arguments, without sbatch.
# Do not bind GPUs per task (--gpus-per-task, --gpu-bind): JAX picks each process's GPU from
# SLURM_LOCALID among all of the node's GPUs (a task that sees a single GPU uses that one).
#
# The script runs itself once per task with srun; each task starts `python -m vqlc.main` with
# VQLC_DISTRIBUTED=1, and jax.distributed.initialize() reads the job step (coordinator: first
# node, port from the job id or JAX_COORDINATOR_PORT; process id: SLURM_PROCID) by itself.
# Environment: PYTHON (default python; e.g. a venv's), VQLC_REPO (default: the submit
# directory), VQLC_PROCESS_PER (gpu | node; default: node when --ntasks-per-node=1).
#SBATCH --job-name=vqlc
#SBATCH --output=%x-%j.out
#SBATCH --exclusive
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: [sbatch <resources>] launch/slurm.sh CONFIG WORKDIR [vqlc.main flags...]" >&2
  exit 2
fi
if [[ -z ${SLURM_JOB_ID:-} ]]; then
  echo "slurm.sh: not inside a SLURM job; submit it with sbatch or run it under salloc" >&2
  exit 2
fi

if [[ -z ${VQLC_SLURM_TASK:-} ]]; then
  # The batch step (or salloc shell): start one task per process. sbatch runs a copy of this
  # script from its spool directory, so the path to re-run is the repository's.
  repo=${VQLC_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
  if [[ ! -f $repo/launch/slurm.sh ]]; then
    echo "slurm.sh: $repo is not the vqlc repository; submit from its root or set VQLC_REPO" >&2
    exit 2
  fi
  export VQLC_SLURM_TASK=1 VQLC_REPO=$repo
  # --kill-on-bad-exit: one failed process ends the step instead of leaving the others
  # blocked in a collective.
  exec srun --kill-on-bad-exit=1 bash "$repo/launch/slurm.sh" "$@"
fi

config=$1
workdir=$2
shift 2
cd "$VQLC_REPO"
mode=${VQLC_PROCESS_PER:-}
if [[ -z $mode ]]; then
  mode=gpu
  if [[ ${SLURM_NTASKS_PER_NODE:-} == 1 ]]; then mode=node; fi
fi
case $mode in
  node)
    # JAX would otherwise give a SLURM process only the GPU numbered SLURM_LOCALID.
    gpus=$(nvidia-smi -L | wc -l)
    JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))
    export JAX_LOCAL_DEVICE_IDS
    ;;
  gpu)
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} && $CUDA_VISIBLE_DEVICES != *,* ]]; then
      export JAX_LOCAL_DEVICE_IDS=0  # SLURM bound one GPU to this task: it is device 0
    fi
    ;;
  *)
    echo "slurm.sh: VQLC_PROCESS_PER=$mode; use gpu or node" >&2
    exit 2
    ;;
esac
export VQLC_DISTRIBUTED=1
exec "${PYTHON:-python}" -m vqlc.main --config="$config" --workdir="$workdir" "$@"
