#!/usr/bin/env bash
# Everything the GPU machine checks and times, in sections with their own time limits, so that
# one device call (10 minutes at most) runs several of them:
#   SECTIONS="kernels:260 tests:120 decode-1b:190" bash benchmarks/gpu_session.sh
# Sections: kernels (benchmarks/kernels.py), ab (benchmarks/ab_kernels.py against AB_PREV, a git
# revision), anatomy (benchmarks/anatomy.py), decode-anatomy (benchmarks/decode_anatomy.py:
# a decode step's kernels, dense vs prunepath; ANATOMY_ARGS adds arguments), tests (tests/test_gpu.py), recompiles (the
# prompt-length test with dynamo's recompile reasons), triton-tests
# (tests/test_triton_ffn.py on compiled kernels), decode-1b, decode-8b, decode-smollm2 (benchmarks/decode.py;
# DECODE_ARGS adds arguments, e.g. "--batches 1 --fractions 0.5 0.25"; KERNELS_ARGS to
# kernels.py, e.g. "--skip decode sweep" for numerics and the many-token table only;
# TRITON_TESTS_K selects kernel tests, e.g. "launch_plans or ties").
# Logs and JSON go to $RESULTS and, packed, to $OUT/results.tgz (the device tool brings back at
# most 8 files); commit them under benchmarks/results/ with the command that made them.
set -uo pipefail
RESULTS=${RESULTS:-/tmp/gpu_results}
mkdir -p "$RESULTS"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
pack() { [ -n "${OUT:-}" ] && tar czf "$OUT/results.tgz" -C "$RESULTS" . ; }
trap pack EXIT
log() { echo "[$(date +%T)] $*" | tee -a "$RESULTS/session.log"; }
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  log "start $name (limit ${limit}s): $*"
  timeout -k 5 "$limit" "$@" > "$RESULTS/$name.log" 2>&1
  log "end $name: exit $?"
  tail -n 40 "$RESULTS/$name.log"
}
log "$(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader)"
log "$(python -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)')"
# the backend is found by name through its entry point: install the project (offline, no deps)
python -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$RESULTS/pip.log" 2>&1 \
  || log "pip install -e . failed (see pip.log)"
log "git $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) uncommitted paths"
for section in ${SECTIONS:-kernels:260 tests:120 decode-1b:190}; do
  name=${section%%:*} limit=${section#*:}
  case $name in
    kernels)      step kernels "$limit" python benchmarks/kernels.py --out "$RESULTS" --budget-s $((limit - 50)) ${KERNELS_ARGS:-} ;;
    ab)           step ab "$limit" python benchmarks/ab_kernels.py --prev ${AB_PREV:?AB_PREV names the revisions or kernel files to compare with} --out "$RESULTS" ${AB_ARGS:-} ;;
    anatomy)      step anatomy "$limit" python benchmarks/anatomy.py --out "$RESULTS" ;;
    decode-anatomy) step decode_anatomy "$limit" python benchmarks/decode_anatomy.py --out "$RESULTS" ${ANATOMY_ARGS:-} ;;
    recompiles)   TORCH_LOGS=recompiles step recompiles "$limit" python -m pytest -q -x -s -p no:cacheprovider tests/test_gpu.py -k prompt_lengths ;;
    tests)        step pytest_gpu "$limit" python -m pytest -q -x -p no:cacheprovider tests/test_gpu.py ;;
    triton-tests) step pytest_triton "$limit" python -m pytest -q -x -p no:cacheprovider tests/test_triton_ffn.py ${TRITON_TESTS_K:+-k "$TRITON_TESTS_K"} ;;
    decode-1b)    step decode_1b "$limit" python benchmarks/decode.py --models llama3-1b ${DECODE_ARGS:-} --out "$RESULTS/decode_1b.json" ;;
    decode-8b)    step decode_8b "$limit" python benchmarks/decode.py --models llama3-8b ${DECODE_ARGS:-} --out "$RESULTS/decode_8b.json" ;;
    decode-smollm2) step decode_smollm2 "$limit" python benchmarks/decode.py --models smollm2-135m-shape --expert-size 8 ${DECODE_ARGS:-} --out "$RESULTS/decode_smollm2.json" ;;
    *) log "unknown section $name" ;;
  esac
done
