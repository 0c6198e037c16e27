#!/usr/bin/env bash
# One device call (at most 10 minutes): the GPU tests (about 3.5 minutes on 8 workers), the
# decode/prefill tables against SDPA enable_gqa (attention.py --quick), host time per eager
# call and kernels per compiled layer (host.py), then the 32-layer serving benchmark (serve.py)
# in whatever time is left.
# Each step has its own timeout and the whole session ends by $BUDGET_S (default 530 s);
# logs go to $OUT (default gpu-out/), one file per step, each headed by GPU, date and commit.
#   run on the device:  TQ_COMMIT=<hash> bash bench/gpu_session.sh
# (TQ_COMMIT names the commit where the copied tree has no .git.) AB_BASE=<dir> (a checkout of
# an earlier commit, e.g. `git archive <rev> | tar -x -C ab/base`; ab/ is git-ignored, so the
# device run needs carry=["ab"]) and AB_COMMIT=<its hash> add that tree's decode tables after
# this one's, for a same-call A/B.
# Not run here: the full
# attention tables (bench/attention.py), bench/compress.py and bench/decode_model.py.
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONPATH=. PYTHONUNBUFFERED=1
if [ -z "${TQ_COMMIT:-}" ] && git rev-parse --short HEAD >/dev/null 2>&1; then
    TQ_COMMIT=$(git rev-parse --short HEAD)$(git diff --quiet HEAD 2>/dev/null || echo -dirty)
fi
export TQ_COMMIT=${TQ_COMMIT:-unknown}
end=$((SECONDS + ${BUDGET_S:-530}))

# step LOG CAP COMMAND...: run COMMAND with a timeout of min(CAP, seconds left), log to $out/LOG
step() {
    local log=$1 cap=$2 left=$((end - SECONDS))
    shift 2
    [ "$left" -lt "$cap" ] && cap=$left
    if [ "$cap" -le 10 ]; then echo "skipped (no time left): $*" | tee "$out/$log"; return; fi
    echo "== $* (timeout ${cap}s)"
    timeout --kill-after=10 "$cap" "$@" 2>&1 | tee "$out/$log"
    echo "== exit ${PIPESTATUS[0]} after $((SECONDS))s of the session"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
step gpu_tests.log 300 python3 -m pytest -q -p no:cacheprovider -n 8 -rfE --tb=short tests/gpu
step attention_quick.md 150 python3 bench/attention.py --quick --json "$out/attention_quick.json"
if [ -n "${AB_BASE:-}" ]; then
    step attention_quick_base.md 150 env -C "$AB_BASE" PYTHONPATH=. TQ_COMMIT="${AB_COMMIT:-base}" \
        python3 bench/attention.py --quick --json "$out/attention_quick_base.json"
fi
step host.md 120 python3 bench/host.py
left=$((end - SECONDS - 60))  # serve starts no row in its last 60 s, then prints
if [ "$left" -ge 60 ]; then
    step serve.md $((left + 60)) python3 bench/serve.py --budget-s "$left"
else
    echo "skipped (under 2 minutes left): bench/serve.py" | tee "$out/serve.md"
fi
