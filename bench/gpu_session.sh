#!/usr/bin/env bash
# Everything a GPU session needs, in one device call (device time is scarce): the GPU tests
# (compress kernel included, via its opt-in), then every benchmark. Logs go to $OUT/.
#   run on the device:  bash bench/gpu_session.sh            (about 8-10 minutes on an H200)
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
python3 -m pytest -q -p no:cacheprovider -n 8 tests/gpu 2>&1 | tee "$out/gpu_tests.log"
python3 bench/compress.py --ties 2>&1 | tee "$out/compress.md"
python3 bench/attention.py 2>&1 | tee "$out/attention.md"
python3 bench/decode_model.py --out "$out" 2>&1 | tee "$out/decode_model.md"
