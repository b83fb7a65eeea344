#!/usr/bin/env bash
# Everything the GPU machine checks and times, in sections that each fit one device call:
#   SECTIONS="tests decode-1b" bash benchmarks/gpu_session.sh      # then: kernels, decode-8b
# Logs and JSON go to $OUT (the device tool brings them back); commit them under
# benchmarks/results/ with the command that made them.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/session.log"; }
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  log "start $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  log "end $name: exit $?"
  tail -n 25 "$OUT/$name.log"
}
log "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
log "$(python -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)')"
for section in ${SECTIONS:-tests decode-1b}; do
  case $section in
    tests)     step pytest_gpu 240 python -m pytest -q -x -p no:cacheprovider tests/test_gpu.py
               step pytest_triton 200 python -m pytest -q -x -p no:cacheprovider tests/test_triton_ffn.py ;;
    kernels)   step kernels 560 python benchmarks/kernels.py --out "$OUT" --budget-s 450 ;;
    decode-1b) step decode_1b 330 python benchmarks/decode.py --models llama3-1b --out "$OUT/decode_1b.json" ;;
    decode-8b) step decode_8b 560 python benchmarks/decode.py --models llama3-8b --out "$OUT/decode_8b.json" ;;
    *) log "unknown section $section" ;;
  esac
done
