#!/usr/bin/env bash
# Runs mim_jax on a Cloud TPU VM slice (one host or a pod slice) from your workstation.
#
#   launch/tpu_pod.sh create            # the slice (or a queued resource with QUEUED=1)
#   launch/tpu_pod.sh install           # clone REPO_URL and pip install on every worker
#   launch/tpu_pod.sh run CONFIG gs://BUCKET/WORKDIR [TRAIN_FLAGS...]
#   launch/tpu_pod.sh tail              # follow worker 0's log (WORKER=all: every worker)
#   launch/tpu_pod.sh stop              # SIGTERM: the run saves a checkpoint and exits
#   launch/tpu_pod.sh delete            # the slice (and its queued resource)
#
# Settings, as environment variables or --flags (--project=..., --tpu_name=...):
#   PROJECT, ZONE, TPU_NAME             every command
#   ACCELERATOR_TYPE, RUNTIME_VERSION   create (e.g. v5litepod-16, v2-alpha-tpuv5-lite)
#   REPO_URL [REPO_REF]                 install (a git URL the workers can clone)
#   QUEUED=1                            create/delete a queued resource named TPU_NAME
#   SPOT=1                              create a Spot slice
#   JAX_SPEC                            install: the JAX requirement (default 'jax[tpu]')
#   DRY_RUN=1                           print the gcloud commands without running them
#
# `run` starts the same command on every worker (--worker=all); the workers find
# each other through the TPU metadata (mim_jax calls jax.distributed.initialize).
# The workdir must be on gs://: every worker writes its part of each checkpoint.
# Rerunning `run` with the same workdir resumes from the latest checkpoint.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "error: $*" >&2; exit 2; }

COMMAND="${1:-}"
case "$COMMAND" in
  create|install|run|tail|stop|delete) shift ;;
  -h|--help|help) usage; exit 0 ;;
  *) usage >&2; die "unknown command '$COMMAND': use create, install, run, tail, stop or delete" ;;
esac
POSITIONAL=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --project=*) PROJECT="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --tpu_name=*) TPU_NAME="${1#*=}" ;;
    --accelerator_type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --runtime_version=*) RUNTIME_VERSION="${1#*=}" ;;
    --repo_url=*) REPO_URL="${1#*=}" ;;
    --repo_ref=*) REPO_REF="${1#*=}" ;;
    --) shift; POSITIONAL+=("$@"); break ;;
    *) POSITIONAL+=("$1") ;;
  esac
  shift
done

require() {  # require NAME...: refuse to go on without these settings
  local missing=()
  for name in "$@"; do [[ -n "${!name:-}" ]] || missing+=("$name"); done
  if [[ ${#missing[@]} -gt 0 ]]; then
    local flags
    flags=$(printf -- '--%s ' "${missing[@],,}")
    die "'$COMMAND' needs ${missing[*]} (environment variables, or ${flags% })"
  fi
}

run() {  # prints a command (shell-quoted), then runs it unless DRY_RUN=1
  local shown="+" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then shown+=" $arg"
    else shown+=" '${arg//\'/\'\\\'\'}'"; fi
  done
  echo "$shown"
  [[ "${DRY_RUN:-0}" == 1 ]] || "$@"
}

check_gcloud() {
  [[ "${DRY_RUN:-0}" == 1 ]] || command -v gcloud >/dev/null \
    || die "gcloud is not installed (https://cloud.google.com/sdk/docs/install); DRY_RUN=1 prints the commands"
}

ssh_all() {  # ssh_all WORKER COMMAND: one shell command on the slice's workers
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
    --worker="$1" --command="$2"
}

LOG='$HOME/mim_jax_run.log'
PIDFILE='$HOME/mim_jax_run.pid'
require PROJECT ZONE TPU_NAME
check_gcloud
case "$COMMAND" in
  create)
    require ACCELERATOR_TYPE RUNTIME_VERSION
    spot=(); [[ "${SPOT:-0}" == 1 ]] && spot=(--spot)
    echo "Creating TPU slice $TPU_NAME ($ACCELERATOR_TYPE, $RUNTIME_VERSION) in $PROJECT/$ZONE"
    if [[ "${QUEUED:-0}" == 1 ]]; then
      run gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" \
        --project="$PROJECT" --zone="$ZONE" --accelerator-type="$ACCELERATOR_TYPE" \
        --runtime-version="$RUNTIME_VERSION" ${spot[@]+"${spot[@]}"}
      echo "Queued; 'gcloud compute tpus queued-resources describe $TPU_NAME --zone=$ZONE' shows when it is ACTIVE"
    else
      run gcloud compute tpus tpu-vm create "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
        --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" ${spot[@]+"${spot[@]}"}
    fi
    ;;
  install)
    require REPO_URL
    ref="${REPO_REF:-}"
    if [[ -n "$ref" ]]; then
      update="git -C mim_jax checkout --detach $(printf %q "origin/$ref") 2>/dev/null || git -C mim_jax checkout --detach $(printf %q "$ref")"
    else
      update="git -C mim_jax pull --ff-only"
    fi
    echo "Installing $REPO_URL${ref:+ at $ref} with ${JAX_SPEC:-jax[tpu]} on every worker of $TPU_NAME"
    ssh_all all "set -e; if [ -d mim_jax ]; then git -C mim_jax fetch --tags origin; else git clone $(printf %q "$REPO_URL") mim_jax; fi; $update; python3 -m pip install -U $(printf %q "${JAX_SPEC:-jax[tpu]}") -e ./mim_jax"
    ;;
  run)
    [[ ${#POSITIONAL[@]} -ge 2 ]] || die "usage: $0 run CONFIG gs://BUCKET/WORKDIR [TRAIN_FLAGS...]"
    config="${POSITIONAL[0]}"; workdir="${POSITIONAL[1]}"; extra=("${POSITIONAL[@]:2}")
    [[ "$workdir" == gs://* ]] \
      || die "the workdir must be a gs:// path (every worker writes its part of each checkpoint), got '$workdir'"
    train=(python3 -m mim_jax.train "--config=$config" "--workdir=$workdir" ${extra[@]+"${extra[@]}"})
    quoted=$(printf ' %q' "${train[@]}")
    echo "Starting on every worker of $TPU_NAME:$quoted"
    echo "Log: $LOG on each worker ('$0 tail'); checkpoints and metrics: $workdir"
    ssh_all all "cd mim_jax && nohup${quoted} > $LOG 2>&1 < /dev/null & echo \$! > $PIDFILE"
    ;;
  tail)
    echo "Following $LOG on worker ${WORKER:-0} of $TPU_NAME (Ctrl-C stops following, not the run)"
    ssh_all "${WORKER:-0}" "tail -n 100 -F $LOG"
    ;;
  stop)
    echo "Sending SIGTERM to the run on every worker of $TPU_NAME: it saves a checkpoint and exits"
    ssh_all all "test -f $PIDFILE && kill -TERM \$(cat $PIDFILE) || echo 'no run on this worker'"
    ;;
  delete)
    echo "Deleting TPU slice $TPU_NAME in $PROJECT/$ZONE"
    if [[ "${QUEUED:-0}" == 1 ]]; then
      run gcloud compute tpus queued-resources delete "$TPU_NAME" --project="$PROJECT" \
        --zone="$ZONE" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --quiet
    fi
    ;;
esac
