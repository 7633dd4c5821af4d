#!/usr/bin/env bash
# The worker side of launch/tpu_pod.sh: what runs on each TPU VM of a slice.
#
# tpu_pod.sh sends this file's text with every command (`bash -c "$(cat
# launch/tpu_worker.sh)" tpu_worker.sh COMMAND ...`), so the workers always run
# the logic of the checkout you launch from. On a worker it also runs by hand:
# `bash ~/mim_jax/launch/tpu_worker.sh status`.
#
#   install REPO_URL PYTHON_VERSION JAX_SPEC [REF]
#       clone (or update) ~/mim_jax at REF (default: the default branch), make the
#       venv ~/mim_jax_venv with Python PYTHON_VERSION (uv fetches it when the
#       image's is older) and install JAX_SPEC and mim_jax[gcs] into it
#   run WORKDIR LOG_SYNC_S STOP_TIMEOUT_S START_CHECK_S TRAIN_FLAGS...
#       stop what is left of an earlier run (SIGTERM: it checkpoints) and any
#       stale process holding the TPU, then start `python -m mim_jax.train
#       TRAIN_FLAGS...` detached, in its own process group
#   stop TIMEOUT_S     SIGTERM to the trainer; wait until it has saved and exited
#   status [LINES]     whether a trainer runs here, and the last lines of its log
#   tail               follow the log of the latest run
#
# Files on each worker:
#   ~/mim_jax_run.pid                 the trainer's pid (= its process group)
#   ~/mim_jax_run.supervisor.pid      the process that waits for it and copies the log
#   ~/mim_jax_logs/<workdir>.log      every run of that workdir, appended, with a
#                                     line per start and exit; copied every
#                                     LOG_SYNC_S seconds and at the end to
#                                     WORKDIR/logs/<host>.log (a VM recreated
#                                     under the same name continues that copy)
#   ~/mim_jax_run.log                 -> the latest run's log
set -uo pipefail

CHECKOUT="$HOME/mim_jax"
VENV="$HOME/mim_jax_venv"
PY="$VENV/bin/python"
LOG_DIR="$HOME/mim_jax_logs"
RUN_LOG="$HOME/mim_jax_run.log"
PIDFILE="$HOME/mim_jax_run.pid"
SUPERVISOR_PIDFILE="$HOME/mim_jax_run.supervisor.pid"
HOST="${HOSTNAME:-$(hostname)}"
# How to start this script again (as a detached supervisor): from its text or its file.
if [[ -n "${BASH_EXECUTION_STRING:-}" ]]; then
  SELF=(bash -c "$BASH_EXECUTION_STRING" tpu_worker.sh)
else
  SELF=(bash "${BASH_SOURCE[0]}")
fi

say() { echo "$HOST: $*"; }
fail() { echo "$HOST: error: $*" >&2; exit 2; }

running() {  # running PID PATTERN: a live process whose command line has PATTERN (not a reused pid)
  [[ "${1:-}" =~ ^[0-9]+$ ]] && tr '\0' ' ' 2>/dev/null < "/proc/$1/cmdline" | grep -q "$2"
}
is_trainer() { running "${1:-}" 'mim_jax\.train'; }

copy_file() {  # copy_file SRC DEST: local or gs:// paths, through mim_jax.io (all or nothing)
  "$PY" -c '
import sys
from mim_jax import io
try:
  io.write_bytes(sys.argv[2], io.read_bytes(sys.argv[1]))
except Exception as error:  # best effort: the run goes on without this copy
  sys.exit(f"warning: copying {sys.argv[1]} to {sys.argv[2]} failed: "
           f"{(str(error) or type(error).__name__).splitlines()[0]}")
' "$1" "$2"
}

tpu_holders() {  # pids with a TPU device open: /dev/accel* (v2-v5e) or /dev/vfio/N (v5p, v6e)
  local fd target
  for fd in /proc/[0-9]*/fd/*; do
    target=$(readlink "$fd" 2>/dev/null) || continue
    case "$target" in
      /dev/accel*|/dev/vfio/[0-9]*) fd=${fd#/proc/}; echo "${fd%%/*}" ;;
    esac
  done | sort -un
}

cmd_stop() {  # cmd_stop TIMEOUT_S
  local timeout=$1 pid start
  pid=$(cat "$PIDFILE" 2>/dev/null)
  if ! is_trainer "$pid"; then
    say "no run"
    return 0
  fi
  say "SIGTERM to the trainer (pid $pid): it saves a checkpoint, then exits"
  kill -TERM "$pid" 2>/dev/null
  start=$SECONDS
  while is_trainer "$pid"; do
    if (( SECONDS - start >= timeout )); then
      say "still running after $timeout s; 'stop' again waits longer (STOP_TIMEOUT_S), and" \
          "'kill -KILL -- -$pid' on this worker ends it without a checkpoint"
      return 1
    fi
    sleep 0.5
  done
  kill -KILL -- "-$pid" 2>/dev/null  # what is left of its process group (data workers)
  # The supervisor notes the exit status in the log and copies it a last time.
  pid=$(cat "$SUPERVISOR_PIDFILE" 2>/dev/null)
  while running "$pid" 'tpu_worker\.sh supervise' && (( SECONDS - start < timeout )); do
    sleep 0.5
  done
  say "stopped after $((SECONDS - start)) s"
}

cleanup() {  # cleanup STOP_TIMEOUT_S: before a run, nothing of an earlier one may hold the TPU
  cmd_stop "$1" || fail "the earlier run did not stop within $1 s; not starting another"
  local holders=() waited=0
  mapfile -t holders < <(tpu_holders)
  if [[ ${#holders[@]} -gt 0 ]]; then
    say "stopping stale processes holding the TPU:"
    ps -o pid=,args= -p "$(IFS=,; echo "${holders[*]}")" | sed "s/^/$HOST:   /"
    kill -TERM "${holders[@]}" 2>/dev/null
    while (( waited < 30 )) && [[ -n "$(tpu_holders)" ]]; do sleep 1; waited=$((waited + 1)); done
    mapfile -t holders < <(tpu_holders)
    [[ ${#holders[@]} -eq 0 ]] || kill -KILL "${holders[@]}" 2>/dev/null
  fi
  rm -f /tmp/libtpu_lockfile 2>/dev/null
  return 0
}

cmd_run() {  # cmd_run WORKDIR LOG_SYNC_S STOP_TIMEOUT_S START_CHECK_S TRAIN_FLAGS...
  local workdir=$1 sync_s=$2 stop_timeout=$3 start_check=$4
  shift 4
  [[ -d "$CHECKOUT" && -x "$PY" ]] \
    || fail "mim_jax is not installed here ($CHECKOUT, $PY): run 'tpu_pod.sh install' first"
  cleanup "$stop_timeout"
  mkdir -p "$LOG_DIR"
  local log="$LOG_DIR/${workdir//[^A-Za-z0-9._-]/_}.log" dest="${workdir%/}/logs/$HOST.log"
  if [[ ! -s "$log" ]]; then
    copy_file "$dest" "$log" 2>/dev/null  # a recreated VM continues the copy of its log
  fi
  ln -sfn "$log" "$RUN_LOG"
  rm -f "$PIDFILE"
  printf '=== %s %s: python -m mim_jax.train%s\n' "$(date -u +%FT%TZ)" "$HOST" \
    "$(printf ' %q' "$@")" >> "$log"
  cd "$CHECKOUT" || fail "cannot enter $CHECKOUT"
  setsid "${SELF[@]}" supervise "$log" "$dest" "$sync_s" "$@" > /dev/null 2>&1 < /dev/null &
  echo $! > "$SUPERVISOR_PIDFILE"
  local pid="" waited=0
  while [[ -z "$pid" ]] && (( waited < 100 )); do
    sleep 0.1
    waited=$((waited + 1))
    pid=$(cat "$PIDFILE" 2>/dev/null)
  done
  [[ -n "$pid" ]] || fail "the trainer did not start; see $log"
  # Most mistakes (a bad flag, a missing config) end the trainer within seconds: show them.
  local start=$SECONDS
  while (( SECONDS - start < start_check )); do
    if ! is_trainer "$pid"; then
      tail -n 20 "$log" | sed "s/^/$HOST:   /"
      fail "the trainer ended within $((SECONDS - start)) s (its log above: $log)"
    fi
    sleep 0.5
  done
  say "training (pid $pid); log $log, copied every $sync_s s to $dest"
}

cmd_supervise() {  # internal, detached by cmd_run: LOG DEST LOG_SYNC_S TRAIN_FLAGS...
  local log=$1 dest=$2 sync_s=$3 trainer copier status
  shift 3
  # The trainer leads its own process group; its pid is what `stop` signals.
  setsid --wait bash -c 'echo $$ > "$0"; exec "$@"' "$PIDFILE" "$PY" -m mim_jax.train "$@" \
    >> "$log" 2>&1 < /dev/null &
  trainer=$!
  (
    trap 'exit 0' TERM  # not while a copy is under way: bash runs the trap after it
    while true; do
      sleep "$sync_s" &
      wait $!
      copy_file "$log" "$dest"
    done
  ) >> "$log" 2>&1 &
  copier=$!
  wait "$trainer"
  status=$?
  kill -TERM "$copier" 2>/dev/null
  wait "$copier"
  echo "=== $(date -u +%FT%TZ) $HOST: the trainer exited with status $status" >> "$log"
  copy_file "$log" "$dest" >> "$log" 2>&1
}

cmd_status() {  # cmd_status [LINES]
  local pid
  pid=$(cat "$PIDFILE" 2>/dev/null)
  if is_trainer "$pid"; then say "training (pid $pid)"; else say "no run"; fi
  if [[ -e "$RUN_LOG" ]]; then
    tail -n "${1:-3}" "$RUN_LOG" | sed "s/^/$HOST:   /"
  fi
}

cmd_install() {  # cmd_install REPO_URL PYTHON_VERSION JAX_SPEC [REF]
  local url=$1 python_version=$2 jax_spec=$3 ref=${4:-} target="origin/HEAD" uv
  set -e
  if [[ -d "$CHECKOUT/.git" ]]; then
    git -C "$CHECKOUT" fetch -q --tags origin
  else
    git clone -q "$url" "$CHECKOUT"
  fi
  if [[ -n "$ref" ]]; then
    target="$ref"
    if git -C "$CHECKOUT" rev-parse -q --verify "origin/$ref^{commit}" > /dev/null; then
      target="origin/$ref"
    fi
  fi
  git -C "$CHECKOUT" checkout -q --detach "$target"
  say "checkout $(git -C "$CHECKOUT" log -1 --format='%h %s')"
  uv=$(command -v uv || echo "$HOME/.local/bin/uv")
  if [[ ! -x "$uv" ]]; then
    say "installing uv"
    curl -LsSf https://astral.sh/uv/install.sh | sh > /dev/null
  fi
  # The image's Python (3.10 on Ubuntu 22.04) is older than jax/flax/orbax need.
  if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != tuple(map(int, sys.argv[1].split("."))))' \
      "$python_version" 2> /dev/null; then
    rm -rf "$VENV"
    "$uv" venv -q --python "$python_version" "$VENV"
  fi
  "$uv" pip install -q --python "$PY" --upgrade "$jax_spec" -e "${CHECKOUT}[gcs]"
  "$PY" -c 'import sys
from importlib.metadata import version
print("Python", sys.version.split()[0], "| jax", version("jax"), "| mim_jax", version("mim_jax"))' \
    | sed "s/^/$HOST: /"
}

COMMAND="${1:-}"
shift || true
case "$COMMAND" in
  install) cmd_install "$@" ;;
  run) cmd_run "$@" ;;
  supervise) cmd_supervise "$@" ;;
  stop) cmd_stop "$@" ;;
  status) cmd_status "$@" ;;
  tail) exec tail -n 100 -F "$RUN_LOG" ;;
  *) fail "unknown command '$COMMAND': use install, run, stop, status or tail" ;;
esac
