#!/usr/bin/env bash
# Kill/resume demonstration (results/reliability.md): two twins of one DP-SGD MNIST run.
#
#   scripts/reliability/run.sh [-h] [OUT_DIR] [HYDRA_OVERRIDE ...]
#
# The uninterrupted twin runs to the end. The interrupted twin is killed with -9 after history step
# $KILL_AFTER, sent SIGTERM after step $TERM_AFTER, and resumed each time with the same command. Both
# use the same privacy secret (the interrupted twin reads the uninterrupted twin's privacy_secret via
# dp.secret_file), so their records must agree bit for bit; compare them with
#   python scripts/reliability/compare.py OUT_DIR
#
# OUT_DIR   where both run folders and the logs go (must not exist yet: a run folder holding
#           checkpoints would be resumed); default outputs/reliability-<UTC time> in the repository.
# Extra arguments are Hydra overrides appended to both twins' command (e.g. a shorter run for a
# smoke test: runner.steps=40 runner.eval_every=20, with KILL_AFTER=15 TERM_AFTER=30).
# Environment: PYTHON (default: .venv/bin/python of the repository), KILL_AFTER (370),
# TERM_AFTER (620), JAX_PLATFORMS (cpu), DPBENCH_DATA (dpbench's default: ../shared/data beside
# the clone; the recorded run read the full MNIST IDX files from it).
#
# The script runs the code of the tree it sits in (the repository root is found from its own
# location). To keep the code fixed while you edit, run it from a `git worktree` at a commit.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  usage
  exit 0
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=${1:-$ROOT/outputs/reliability-$(date -u +%Y%m%dT%H%M%SZ)}
[ $# -gt 0 ] && shift
PY=${PYTHON:-$ROOT/.venv/bin/python}
KILL_AFTER=${KILL_AFTER:-370}
TERM_AFTER=${TERM_AFTER:-620}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}

if [ ! -x "$PY" ]; then
  echo "error: PYTHON=$PY is not an executable; run \`make install\` or set PYTHON" >&2
  exit 2
fi
if [ -e "$OUT" ]; then
  echo "error: OUT_DIR=$OUT already exists; choose a new folder (its checkpoints would be resumed)" >&2
  exit 2
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"

ARGS=(+experiment=mnist_cnn runner.steps=1000 runner.eval_every=250 logger=none runner.progress_bar=false "$@")
SECRET=$OUT/uninterrupted/privacy_secret

log() { echo "$(date -u +%T) $*" | tee -a "$OUT/events.log"; }
log "code: $(git describe --always --dirty 2>/dev/null || echo "not a git checkout"); output in $OUT"
log "command: $PY -m dpbench ${ARGS[*]}"

(
  start=$(date +%s)
  s=0
  "$PY" -m dpbench "${ARGS[@]}" hydra.run.dir="$OUT/uninterrupted" >"$OUT/uninterrupted.log" 2>&1 || s=$?
  log "uninterrupted: exit $s after $(($(date +%s) - start)) s"
) &
uninterrupted=$!

# The interrupted twin starts once the uninterrupted one has stored its privacy secret.
while [ ! -f "$SECRET" ]; do
  if ! kill -0 "$uninterrupted" 2>/dev/null; then
    log "uninterrupted twin stopped before writing $SECRET; see $OUT/uninterrupted.log"
    exit 1
  fi
  sleep 1
done

H=$OUT/interrupted/history.jsonl
last_step() {
  if [ -f "$H" ]; then
    tail -1 "$H" | "$PY" -c "import json,sys; print(json.loads(sys.stdin.read())['step'])" 2>/dev/null || echo 0
  else
    echo 0
  fi
}
run_until() { # $1 = history step after which to send signal $2 (none: run to the end)
  local start pid s
  start=$(date +%s)
  "$PY" -m dpbench "${ARGS[@]}" dp.secret_file="$SECRET" hydra.run.dir="$OUT/interrupted" \
    >>"$OUT/interrupted.log" 2>&1 &
  pid=$!
  if [ -n "${1:-}" ]; then
    while kill -0 "$pid" 2>/dev/null; do
      s=$(last_step)
      if [ "${s:-0}" -ge "$1" ]; then
        kill "-$2" "$pid"
        log "interrupted: sent SIG$2 at history step $s"
        break
      fi
      sleep 1
    done
  fi
  s=0
  wait "$pid" || s=$?
  log "interrupted: exit $s after $(($(date +%s) - start)) s; checkpoints:" \
    "$(ls "$OUT/interrupted/checkpoints" 2>/dev/null | tr '\n' ' ')"
}
run_until "$KILL_AFTER" KILL
run_until "$TERM_AFTER" TERM
run_until
wait "$uninterrupted"
log "done; compare with: $PY scripts/reliability/compare.py $OUT"
