#!/usr/bin/env bash
# Everything that needs a GPU, for one lease of a GPU machine, in named steps:
#
#   bash benchmarks/gpu_session.sh all                  # everything below, in order (about 15 minutes:
#                                                       # over one device call, so run it as the two calls
#                                                       # of benchmarks/NOTES.md)
#   bash benchmarks/gpu_session.sh tests fused          # GPU tests, then the fused-kernel benchmark
#   bash benchmarks/gpu_session.sh warm attention attention-graph
#
# Steps (each with its own time limit in seconds, from the environment, so one that runs long
# cannot eat the next; the benchmarks write their results file after every group, so a step
# stopped at its limit keeps what it measured):
#   tests            GPU tests (tests/gpu, pytest-xdist)                                  TESTS_S
#   warm             compile the attention kernels in parallel (on-disk cache)            WARM_S
#   fused            fused kernels through the public functions' launch path: per call
#                    and graph-replay device time, the 50-step DDPM loop                  FUSED_S
#   attention        attention per call (new launch path) vs SDPA backends                ATTN_S
#   attention-graph  attention from CUDA-graph replays (device time), ATTN_GRAPH_SHAPES   ATTN_GRAPH_S
#   norm             GroupNorm+SiLU and adaLN modulate vs eager and torch.compile         NORM_S
#   host             benchmarks/host_cost.py (stand-in driver, this machine's CPU)        HOST_S
#   sweep            fused kernels: tile sweep and real per-call host time               SWEEP_S
#   end-to-end       benchmarks/bench_end_to_end.py: 50 DDIM steps, bf16, UNet and DiT-B/2  E2E_S
#   targets          issue 17's targets, pass / fail / unmeasured, from the results
# `all` runs tests warm fused attention attention-graph norm host end-to-end targets.
# Logs and the results files are copied to $OUT (the device tool's return folder) when it is
# set, else to _build/gpu.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-_build/gpu}
mkdir -p "$out"
py=${PY:-python3}  # the GPU machines have torch in their python3; PY=.venv/bin/python here
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee -a "$out/env.log"
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$out/env.log"
steps=("$@")
if [ "${#steps[@]}" -eq 1 ] && [ "${steps[0]}" = all ]; then
    steps=(tests warm fused attention attention-graph norm host end-to-end targets)
fi
status=0
for step in "${steps[@]}"; do
    start=$(date +%s)
    case $step in
        tests)
            # In parallel processes (pytest-xdist): the attention tests are dominated by
            # compiling the autotuner's candidates, which one process does one at a time.
            timeout -k 10 "${TESTS_S:-200}" $py -m pytest tests/gpu -v -rfEs -p no:cacheprovider \
                -n "${TEST_JOBS:-12}" --timeout=160 --durations=15 2>&1 | tee "$out/gpu_tests.log" ;;
        warm)
            timeout -k 10 "${WARM_S:-60}" $py benchmarks/warm_attention.py ${ATTN_ARGS:-} 2>&1 | tee "$out/warm_attention.log" ;;
        fused)
            timeout -k 10 "${FUSED_S:-100}" $py benchmarks/bench_fused.py ${FUSED_ARGS:-} 2>&1 | tee "$out/bench_fused.log" ;;
        attention)
            timeout -k 10 "${ATTN_S:-100}" $py benchmarks/bench_attention.py ${ATTN_ARGS:-} ${ATTN_EXTRA:-} 2>&1 | tee "$out/bench_attention.log" ;;
        attention-graph)
            # Graph replays for the shapes whose per-call time is host-bound (indices into SHAPES).
            timeout -k 10 "${ATTN_GRAPH_S:-60}" $py benchmarks/bench_attention.py --graph \
                --shapes ${ATTN_GRAPH_SHAPES:-0 4 5} ${ATTN_ARGS:-} 2>&1 | tee "$out/bench_attention_graph.log" ;;
        norm)
            timeout -k 10 "${NORM_S:-60}" $py benchmarks/bench_norm.py ${NORM_ARGS:-} 2>&1 | tee "$out/bench_norm.log" ;;
        host)
            # The host cost of the launch path, measured as on a CPU-only machine (the launcher
            # stubbed at the driver boundary), on this machine's CPU; the real per-call host time
            # with launches is the `sweep` step's.
            timeout -k 10 "${HOST_S:-40}" $py benchmarks/host_cost.py --calls 1000 --out "$out/host_cost_gpu_host.json" \
                2>&1 | tee "$out/host_cost.log" ;;
        sweep)
            timeout -k 10 "${SWEEP_S:-150}" $py benchmarks/sweep_fused.py --out "$out/sweep_fused.json" 2>&1 | tee "$out/sweep_fused.log" ;;
        end-to-end)
            # End to end (issue 17): 50 DDIM steps in bf16, the package's 'ddpm-cifar' UNet at
            # batch 256 (eager, the fast path with and without its graph, torch.compile last) and
            # DiT-B/2 at 1024 tokens (batch 256) and 4096 tokens (batch 64), eager vs the fast path
            # (stepdiff.fast: the kernels, channels-last, the whole loop in one CUDA graph). Records
            # are written after each implementation, so a step stopped at its limit keeps what it
            # measured. E2E_ARGS="--cases unet" (or dit) runs one model, e.g. to split the step.
            timeout -k 10 "${E2E_S:-300}" $py benchmarks/bench_end_to_end.py ${E2E_ARGS:-} 2>&1 | tee "$out/bench_end_to_end.log" ;;
        targets)
            $py benchmarks/targets.py --host "$out/host_cost_gpu_host.json" 2>&1 | tee "$out/targets.log" ;;
        *) echo "unknown step: $step (all, tests, warm, fused, attention, attention-graph, norm, host, sweep, end-to-end, targets)"; exit 2 ;;
    esac
    rc=${PIPESTATUS[0]}
    echo "== step $step: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$out/env.log"
    [ "$rc" -eq 0 ] || status=1
    cp benchmarks/results/*.json "$out/" 2>/dev/null || true
done
exit $status
