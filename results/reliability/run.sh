#!/bin/bash
# Code: git worktree /work/rel_wt at a fixed commit (the shared working tree changes under us).
# Uninterrupted and interrupted twins of: python -m dpbench +experiment=mnist_cnn runner.steps=1000 runner.eval_every=250
# The interrupted twin is killed with -9 after history step 370, sent SIGTERM after step 620, and resumed each time.
OUT=/work/main/outputs/reliability2
export DPBENCH_DATA=/work/shared/data JAX_PLATFORMS=cpu
cd /work/rel_wt
ARGS="+experiment=mnist_cnn runner.steps=1000 runner.eval_every=250 logger=none runner.progress_bar=false"
PY=/work/main/.venv/bin/python
log() { echo "$(date -u +%T) $*" >> $OUT/events.log; }
log "commit $(git rev-parse --short HEAD)"
( start=$(date +%s); $PY -m dpbench $ARGS hydra.run.dir=$OUT/uninterrupted > $OUT/uninterrupted.log 2>&1; s=$?; log "uninterrupted: exit $s after $(( $(date +%s) - start )) s" ) &
H=$OUT/interrupted/history.jsonl
last_step() { [ -f $H ] && tail -1 $H | python3 -c "import json,sys; print(json.loads(sys.stdin.read())['step'])" 2>/dev/null || echo 0; }
run_until() {  # $1 = history step after which to send signal $2 (none: run to the end)
  start=$(date +%s)
  $PY -m dpbench $ARGS hydra.run.dir=$OUT/interrupted >> $OUT/interrupted.log 2>&1 &
  pid=$!
  if [ -n "$1" ]; then
    while kill -0 $pid 2>/dev/null; do
      s=$(last_step); if [ "${s:-0}" -ge "$1" ]; then kill -$2 $pid; log "interrupted: sent SIG$2 at history step $s"; break; fi
      sleep 1
    done
  fi
  wait $pid; s=$?
  log "interrupted: exit $s after $(( $(date +%s) - start )) s; checkpoints: $(ls $OUT/interrupted/checkpoints | tr '\n' ' ')"
}
run_until 370 KILL
run_until 620 TERM
run_until
wait
log "done"
