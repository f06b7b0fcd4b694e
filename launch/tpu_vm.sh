#!/usr/bin/env bash
# All workers of a Cloud TPU VM slice (e.g. v4-32: 4 hosts) run the same command over SSH.
#
# Usage, from any machine with gcloud:
#   launch/tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR [vqlc.main flags...]
# Example:
#   launch/tpu_vm.sh my-v4-32 us-central2-b vqlc/configs/imagenet_lc.py /mnt/shared/runs/lc \
#       --config.codebook.path=/mnt/shared/runs/cb/codebook.npy
#
# Every worker needs the repository at VQLC_REPO_DIR (default: vqlc, relative to the home
# directory) with its dependencies installed (pip install -e . and jax[tpu]), and WORKDIR on a
# filesystem all workers share (NFS / Filestore, or a gcsfuse mount): process 0 writes
# metrics, images and config there, and every process writes its part of each checkpoint.
# VQLC_DISTRIBUTED=1 makes each worker call jax.distributed.initialize(), which reads the
# worker list and this worker's id from the TPU metadata (vqlc also detects a multi-worker
# slice by itself). Environment: VQLC_REPO_DIR, PYTHON (default python3 on the workers),
# PROJECT (gcloud project, default: gcloud's), VQLC_SSH_FLAGS (extra `gcloud ... ssh` flags,
# e.g. "--internal-ip").
set -euo pipefail

if [[ $# -lt 4 ]]; then
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
tpu=$1
zone=$2
shift 2

# Quote every argument for the remote shell: config overrides may hold spaces or brackets.
remote_args=$(printf ' %q' "--config=$1" "--workdir=$2" "${@:3}")
repo_dir=$(printf '%q' "${VQLC_REPO_DIR:-vqlc}")
python=$(printf '%q' "${PYTHON:-python3}")
command="cd $repo_dir && VQLC_DISTRIBUTED=1 $python -m vqlc.main$remote_args"

gcloud_args=(compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="$command")
if [[ -n ${PROJECT:-} ]]; then
  gcloud_args+=(--project="$PROJECT")
fi
if [[ -n ${VQLC_SSH_FLAGS:-} ]]; then
  read -r -a extra <<<"$VQLC_SSH_FLAGS"
  gcloud_args+=("${extra[@]}")
fi
echo "tpu_vm.sh: on every worker of $tpu: $command" >&2
exec gcloud "${gcloud_args[@]}"
