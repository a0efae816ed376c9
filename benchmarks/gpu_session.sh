#!/usr/bin/env bash
# Everything that needs a GPU, for one lease of a GPU machine, in named steps:
#
#   bash benchmarks/gpu_session.sh tests fused          # GPU tests, then the fused-kernel benchmark
#   bash benchmarks/gpu_session.sh warm attention       # compile in parallel, then time attention
#   bash benchmarks/gpu_session.sh sweep                # fused kernels: launch settings, host cost
#
# Each step has its own time limit (seconds, from the environment: TESTS_S, WARM_S, ATTN_S, FUSED_S, SWEEP_S), so
# one that runs long cannot eat the next; the benchmarks write their results file after every
# group, so a step stopped at its limit keeps what it measured. Logs and the results file are
# copied to $OUT (the device tool's return folder) when it is set, else to _build/gpu.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-_build/gpu}
mkdir -p "$out"
py=python3
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee -a "$out/env.log"
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$out/env.log"
status=0
for step in "$@"; do
    start=$(date +%s)
    case $step in
        tests)
            # In parallel processes (pytest-xdist): the attention tests are dominated by
            # compiling the autotuner's candidates, which one process does one at a time.
            timeout -k 10 "${TESTS_S:-270}" $py -m pytest tests/gpu -v -rfEs -p no:cacheprovider \
                -n "${TEST_JOBS:-12}" --timeout=250 --durations=15 2>&1 | tee "$out/gpu_tests.log" ;;
        warm)
            timeout -k 10 "${WARM_S:-200}" $py benchmarks/warm_attention.py ${ATTN_ARGS:-} 2>&1 | tee "$out/warm_attention.log" ;;
        sweep)
            timeout -k 10 "${SWEEP_S:-150}" $py benchmarks/sweep_fused.py --out "$out/sweep_fused.json" 2>&1 | tee "$out/sweep_fused.log" ;;
        fused)
            timeout -k 10 "${FUSED_S:-270}" $py benchmarks/bench_fused.py 2>&1 | tee "$out/bench_fused.log" ;;
        attention)
            timeout -k 10 "${ATTN_S:-540}" $py benchmarks/bench_attention.py ${ATTN_ARGS:-} ${ATTN_EXTRA:-} 2>&1 | tee "$out/bench_attention.log" ;;
        *) echo "unknown step: $step (tests, warm, attention, fused, sweep)"; exit 2 ;;
    esac
    rc=${PIPESTATUS[0]}
    echo "== step $step: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$out/env.log"
    [ "$rc" -eq 0 ] || status=1
    cp benchmarks/results/*.json "$out/" 2>/dev/null || true
done
exit $status
