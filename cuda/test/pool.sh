# Sourced by cuda/test/run.sh and .ci/cuda-check.sh: run commands in the background, at most POOL_JOBS at a time
# (ORCH_TEST_JOBS, default: the number of CPUs). pool_fail is 1 once any of them has failed.
POOL_JOBS=${ORCH_TEST_JOBS:-$(nproc 2>/dev/null || echo 1)}
pool_running=0
pool_fail=0
pool_run() { # command...: starts it once a slot is free
  if [ "$pool_running" -ge "$POOL_JOBS" ]; then
    wait -n || pool_fail=1
    pool_running=$((pool_running - 1))
  fi
  "$@" &
  pool_running=$((pool_running + 1))
}
pool_wait() { # until every started command has ended
  while [ "$pool_running" -gt 0 ]; do
    wait -n || pool_fail=1
    pool_running=$((pool_running - 1))
  done
}
