#!/usr/bin/env bash
# Runs mim_jax on Cloud TPU VMs (one host, a pod slice, or several slices) from your workstation.
#
#   launch/tpu_pod.sh create            # the slice (QUEUED=1: a queued resource); waits until it is up
#   launch/tpu_pod.sh install           # on every worker: the checkout, a Python 3.11 venv (uv), jax[tpu], mim_jax[gcs]
#   launch/tpu_pod.sh run CONFIG WORKDIR [TRAIN_FLAGS...]   # start (or resume) training on every worker
#   launch/tpu_pod.sh status            # the slice's state; per worker: training or not, the last log lines
#   launch/tpu_pod.sh tail              # follow worker 0's log (WORKER=all: every worker's)
#   launch/tpu_pod.sh stop              # SIGTERM to every trainer: a checkpoint, then exit (waits for it)
#   launch/tpu_pod.sh resume CONFIG WORKDIR [TRAIN_FLAGS...]  # after a preemption: recreate if needed, wait, install, run
#   launch/tpu_pod.sh delete            # the slice (and its queued resource)
#
# Settings, as environment variables or --flags (--project=..., --tpu-name=..., --node-count=...):
#   PROJECT, ZONE, TPU_NAME     every command
#   ACCELERATOR_TYPE            create, resume: v4-32, v5litepod-16 (v5e), v5p-32, v6e-16, ...
#   RUNTIME_VERSION             create, resume: the TPU VM image for that TPU:
#                                 v4: tpu-ubuntu2204-base    v5e: v2-alpha-tpuv5-lite
#                                 v5p: v2-alpha-tpuv5        v6e: v2-alpha-tpuv6e
#   QUEUED=1                    a queued resource named TPU_NAME (the way to get Spot and multislice capacity)
#   SPOT=1                      a Spot slice: cheaper, preemptible ('resume' brings the run back)
#   SERVICE_ACCOUNT             create, resume: the workers' service account (default: the project's
#                               Compute Engine one); it needs write access to the bucket
#   NODE_COUNT=N                multislice: N slices of ACCELERATOR_TYPE in one queued resource (needs
#                               QUEUED=1); the data axis spans the slices (config mesh.dcn_data)
#   REPO_URL, REPO_REF          install: the repository (default: the project's) and a branch, tag or commit
#   PYTHON_VERSION              install: the venv's Python (default 3.11)
#   JAX_SPEC                    install: the JAX requirement (default 'jax[tpu]')
#   WORKER, NODE                tail: which worker (default 0; all) and, multislice, which slice (default 0)
#   LOG_SYNC_S                  run: seconds between copies of each worker's log to WORKDIR/logs/ (default 60)
#   STOP_TIMEOUT_S              stop, run: how long to wait for a run to save and exit (default 600)
#   POLL_S, WAIT_TIMEOUT_S      create, resume: seconds between state checks (30) and the longest wait (86400)
#   DRY_RUN=1                   print the gcloud commands without running them
#
# WORKDIR must be storage every worker writes its part of each checkpoint to: gs://BUCKET/...
# (or a file system mounted on every worker). Rerunning `run` with the same workdir resumes
# from the latest checkpoint. The workers find each other through the TPU metadata
# (mim_jax calls jax.distributed.initialize). Worker-side logic: launch/tpu_worker.sh.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORKER_SCRIPT="$HERE/tpu_worker.sh"
DEFAULT_REPO_URL="https://github.com/mim-jax/mim_jax"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "error: $*" >&2; exit 2; }

COMMAND="${1:-}"
case "$COMMAND" in
  create|install|run|status|tail|stop|resume|delete) shift ;;
  -h|--help|help) usage; exit 0 ;;
  *) usage >&2
     die "unknown command '$COMMAND': use create, install, run, status, tail, stop, resume or delete" ;;
esac
POSITIONAL=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --project=*|--zone=*|--tpu[-_]name=*|--accelerator[-_]type=*|--runtime[-_]version=*|\
    --repo[-_]url=*|--repo[-_]ref=*|--node[-_]count=*)
      name="${1%%=*}"; name="${name#--}"; name="${name//-/_}"
      printf -v "${name^^}" '%s' "${1#*=}" ;;
    --) shift; POSITIONAL+=("$@"); break ;;
    *) POSITIONAL+=("$1") ;;
  esac
  shift
done
NODE_COUNT="${NODE_COUNT:-1}"
[[ "$NODE_COUNT" =~ ^[1-9][0-9]*$ ]] || die "NODE_COUNT=$NODE_COUNT must be a positive number of slices"
if (( NODE_COUNT > 1 )) && [[ "${QUEUED:-0}" != 1 ]]; then
  die "multislice (NODE_COUNT=$NODE_COUNT) needs a queued resource: set QUEUED=1 too"
fi

require() {  # require NAME...: refuse to go on without these settings
  local missing=() name flags
  for name in "$@"; do [[ -n "${!name:-}" ]] || missing+=("$name"); done
  if [[ ${#missing[@]} -gt 0 ]]; then
    flags=$(printf -- '--%s ' "${missing[@],,}")
    die "'$COMMAND' needs ${missing[*]} (environment variables, or ${flags% })"
  fi
}

show() {  # show ARG...: prints a command, shell-quoted, after '+'
  local shown="+" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then shown+=" $arg"
    else shown+=" '${arg//\'/\'\\\'\'}'"; fi
  done
  echo "$shown"
}

run() {  # prints a command, then runs it unless DRY_RUN=1
  show "$@"
  [[ "${DRY_RUN:-0}" == 1 ]] || "$@"
}

check_gcloud() {
  [[ "${DRY_RUN:-0}" == 1 ]] || command -v gcloud >/dev/null \
    || die "gcloud is not installed (https://cloud.google.com/sdk/docs/install); DRY_RUN=1 prints the commands"
}

on_workers() {  # on_workers WORKERS COMMAND ARGS...: launch/tpu_worker.sh COMMAND on the workers
  local workers=$1 args ssh
  shift
  printf -v args ' %q' "$@"
  if (( NODE_COUNT > 1 )); then
    ssh=(gcloud compute tpus queued-resources ssh "$TPU_NAME" "${WHERE[@]}" "--node=${NODE:-all}")
  else
    ssh=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${WHERE[@]}")
  fi
  # The worker script travels as text; shown by name.
  show "${ssh[@]}" "--worker=$workers" \
    "--command=bash -c \"\$(cat launch/tpu_worker.sh)\" tpu_worker.sh$args"
  if [[ "${DRY_RUN:-0}" != 1 ]]; then
    local text
    text=$(< "$WORKER_SCRIPT")
    "${ssh[@]}" "--worker=$workers" \
      "--command=bash -c '${text//\'/\'\\\'\'}' tpu_worker.sh$args"
  fi
}

slice_state() {  # the slice's state (READY, ACTIVE, PREEMPTED, ...), or NOT_FOUND
  local out
  if [[ "${QUEUED:-0}" == 1 ]]; then
    out=$(gcloud compute tpus queued-resources describe "$TPU_NAME" "${WHERE[@]}" \
          --format='value(state.state)' 2>&1) && { echo "${out##*$'\n'}"; return 0; }
  else
    out=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${WHERE[@]}" \
          --format='value(state)' 2>&1) && { echo "${out##*$'\n'}"; return 0; }
  fi
  if [[ "$out" == *NOT_FOUND* || "$out" == *"not found"* ]]; then
    echo NOT_FOUND
    return 0
  fi
  die "could not read the state of $TPU_NAME: ${out##*$'\n'}"
}

show_state_query() {
  if [[ "${QUEUED:-0}" == 1 ]]; then
    show gcloud compute tpus queued-resources describe "$TPU_NAME" "${WHERE[@]}" --format='value(state.state)'
  else
    show gcloud compute tpus tpu-vm describe "$TPU_NAME" "${WHERE[@]}" --format='value(state)'
  fi
}

wait_until_up() {  # polls the state until READY (ACTIVE for a queued resource)
  local want=READY state last="" start=$SECONDS
  [[ "${QUEUED:-0}" == 1 ]] && want=ACTIVE
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    show_state_query
    echo "(dry run: would repeat this every ${POLL_S:-30} s until $want)"
    return 0
  fi
  while true; do
    state=$(slice_state) || exit 2
    [[ "$state" == "$last" ]] || echo "$(date +%T) $TPU_NAME: $state"
    last=$state
    [[ "$state" == "$want" ]] && return 0
    case "$state" in
      FAILED|SUSPENDED|PREEMPTED|TERMINATED|STOPPED|NOT_FOUND)
        die "$TPU_NAME is $state, not becoming $want; '$0 resume ...' recreates it" ;;
    esac
    (( SECONDS - start < ${WAIT_TIMEOUT_S:-86400} )) \
      || die "$TPU_NAME still $state after ${WAIT_TIMEOUT_S:-86400} s (WAIT_TIMEOUT_S); it stays requested: '$0 status' shows it"
    sleep "${POLL_S:-30}"
  done
}

create_slice() {
  require ACCELERATOR_TYPE RUNTIME_VERSION
  local spot=() nodes=(--node-id="$TPU_NAME") what="TPU slice" account=()
  [[ "${SPOT:-0}" == 1 ]] && spot=(--spot) && what="Spot TPU slice"
  if [[ -n "${SERVICE_ACCOUNT:-}" ]]; then
    account=(--service-account="$SERVICE_ACCOUNT" --scopes=https://www.googleapis.com/auth/cloud-platform)
  fi
  if (( NODE_COUNT > 1 )); then
    nodes=(--node-count="$NODE_COUNT" --node-prefix="$TPU_NAME")
    what="$NODE_COUNT ${what}s"
  fi
  echo "Creating $what $TPU_NAME ($ACCELERATOR_TYPE, $RUNTIME_VERSION) in $PROJECT/$ZONE"
  if [[ "${QUEUED:-0}" == 1 ]]; then
    run gcloud compute tpus queued-resources create "$TPU_NAME" "${nodes[@]}" "${WHERE[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" \
      ${spot[@]+"${spot[@]}"} ${account[@]+"${account[@]}"}
  else
    run gcloud compute tpus tpu-vm create "$TPU_NAME" "${WHERE[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" \
      ${spot[@]+"${spot[@]}"} ${account[@]+"${account[@]}"}
  fi
  wait_until_up
}

delete_slice() {
  echo "Deleting $TPU_NAME in $PROJECT/$ZONE"
  if [[ "${QUEUED:-0}" == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$TPU_NAME" "${WHERE[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${WHERE[@]}" --quiet
  fi
}

install_workers() {
  local url="${REPO_URL:-$DEFAULT_REPO_URL}" ref="${REPO_REF:-}"
  echo "Installing $url${ref:+ at $ref} on every worker of $TPU_NAME: Python" \
       "${PYTHON_VERSION:-3.11} in ~/mim_jax_venv (uv), ${JAX_SPEC:-jax[tpu]}, mim_jax[gcs]"
  on_workers all install "$url" "${PYTHON_VERSION:-3.11}" "${JAX_SPEC:-jax[tpu]}" ${ref:+"$ref"}
}

start_run() {
  [[ ${#POSITIONAL[@]} -ge 2 ]] || die "usage: $0 $COMMAND CONFIG WORKDIR [TRAIN_FLAGS...]"
  local config="${POSITIONAL[0]}" workdir="${POSITIONAL[1]}" extra=("${POSITIONAL[@]:2}")
  case "$workdir" in
    gs://*) ;;
    /*) echo "Note: $workdir must be a file system mounted on every worker (Filestore, NFS);" \
             "use gs://BUCKET/... otherwise" ;;
    *) die "the workdir must be gs://BUCKET/... (every worker writes its part of each checkpoint) or an absolute path every worker mounts, got '$workdir'" ;;
  esac
  local train=("--config=$config" "--workdir=$workdir" ${extra[@]+"${extra[@]}"})
  local sync="${LOG_SYNC_S:-60}"
  echo "Starting on every worker of $TPU_NAME: python -m mim_jax.train$(printf ' %q' "${train[@]}")"
  on_workers all run "$workdir" "$sync" "${STOP_TIMEOUT_S:-600}" "${START_CHECK_S:-10}" \
    "${train[@]}"
  echo "Follow: '$0 tail' (WORKER=all: every worker); stop: '$0 stop'. Each worker's log" \
       "is copied every $sync s to ${workdir%/}/logs/."
}

require PROJECT ZONE TPU_NAME
WHERE=(--project="$PROJECT" --zone="$ZONE")
check_gcloud
case "$COMMAND" in
  create) create_slice ;;
  install) install_workers ;;
  run) start_run ;;
  status)
    show_state_query
    [[ "${DRY_RUN:-0}" == 1 ]] || echo "$TPU_NAME: $(slice_state)"
    on_workers all status 3
    ;;
  tail)
    echo "Following the log of worker ${WORKER:-0} of $TPU_NAME (Ctrl-C stops following, not the run)"
    NODE="${NODE:-0}" on_workers "${WORKER:-0}" tail
    ;;
  stop)
    echo "SIGTERM to the trainer on every worker of $TPU_NAME; waiting (up to" \
         "${STOP_TIMEOUT_S:-600} s) while it saves a checkpoint and exits"
    on_workers all stop "${STOP_TIMEOUT_S:-600}"
    ;;
  resume)
    [[ ${#POSITIONAL[@]} -ge 2 ]] || die "usage: $0 resume CONFIG WORKDIR [TRAIN_FLAGS...]"
    require ACCELERATOR_TYPE RUNTIME_VERSION
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
      show_state_query
      state=PREEMPTED
      echo "(dry run: the state is not read; showing what a preempted slice gets)"
    else
      state=$(slice_state)
    fi
    echo "$TPU_NAME: $state"
    case "$state" in
      READY|ACTIVE) ;;  # up: the run resumes on it
      NOT_FOUND) create_slice; install_workers ;;
      CREATING|STARTING|RESTARTING|REPAIRING|ACCEPTED|PROVISIONING|WAITING_FOR_RESOURCES)
        wait_until_up; install_workers ;;
      *) delete_slice; create_slice; install_workers ;;  # PREEMPTED, TERMINATED, SUSPENDED, FAILED, ...
    esac
    start_run
    ;;
  delete) delete_slice ;;
esac
