#!/usr/bin/env bash
# Re-measure the README's "On a GPU" figures on one CUDA GPU, in one go (a few minutes on an
# H200; every log is written as it goes, so a run cut short still leaves what it measured):
#   1. the shipped unconditional U-Net, 1 member: sequential-sde, piadm-sde, window, pc-window,
#      pc-window-ode (rounds, calls, distance, wall)                          -> unet_1.log
#   2. `piadm plan` for it on 1 rank with 1 and with 64 members, then the plan's pick
#      (sampler.method = "auto") against sequential-sde with all members in one batch, each
#      a whole `piadm sample` run                         -> plan_M.log, sample_M_{auto,seq}.log
#   3. the same U-Net with 16 members in one batch                           -> unet_16.log
#   4. the exact grf model, 1 member, 64x64 to 2048x2048, the same methods   -> grf.log
#   5. where mpiexec is on PATH, the scale-out table on the host's cores, GPU hidden
#      (jobs/local/scale_bench.sh: a core per rank, which a laptop or CI machine lacks) -> scale/
# Tolerances are calibrated on the GPU (sampler.tol = "auto"), noise drawn on the device.
#   bash jobs/local/gpu_bench.sh [OUTDIR]      (default out/gpu; summary.txt gathers the rows)
# PIADM_GPU_QUICK=1 runs every step tiny (few steps, small fields) to try the script on a CPU
# (10 to 20 minutes on 2 cores; 18.5 measured beside two other jobs).
# PIADM_GPU_STEP_S (default 420) bounds each step's seconds; a step over it is stopped.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source jobs/common.sh
out="${1:-out/gpu}"
mkdir -p "$out"
summary="$out/summary.txt"
limit="${PIADM_GPU_STEP_S:-420}"
unet=jobs/configs/kolmogorov_uncond.toml
grf=jobs/configs/grf.toml
methods='["sequential-sde", "piadm-sde", "window", "pc-window", "pc-window-ode"]'
grf_sizes='[[64, 64], [256, 256], [1024, 1024], [2048, 2048]]'
quick=()
big=64
wide=16
if [ -n "${PIADM_GPU_QUICK:-}" ]; then
    quick=(--set sampler.steps=20 --set 'calibrate.ladder=[0.1, 1e-3, 1e-5, 1e-7]' --set calibrate.members=1)
    grf_sizes='[[16, 16], [32, 32]]'
    big=4
    wide=2
fi
common=(--set sampler.noise=device --set sampler.tol=auto "${quick[@]}")

# Run one step: its log in $out/NAME.log, its status and seconds in the summary; a failing
# step does not stop the others.
step() {
    local name=$1 t0 rc=0
    shift
    echo "== $name: ${piadm[*]} $*" | tee -a "$summary"
    t0=$(date +%s)
    timeout "$limit" "${piadm[@]}" "$@" >"$out/$name.log" 2>&1 || rc=$?
    echo "   rc $rc, $(($(date +%s) - t0)) s" | tee -a "$summary"
    grep -E '^(\[rank 0/[0-9]+\] )?(method |(sequential|piadm|window|pc-window)[a-z-]* +[0-9])' \
        "$out/$name.log" >>"$summary" || true
    # not the bench's column legend, whose lines say "wall time" and "error" too
    grep -E '^ +[0-9]+ [a-z]|error|wall time|chose|plan|parallel rounds|model calls  ' \
        "$out/$name.log" | grep -vE '^  (rounds|calls_ratio|rel_dist|stat_err|w2|wall_s|'\
'wall_med_s|comm_share|own_share|peak_mib) ' >>"$summary" || true
}

{ echo "# piadm GPU bench, $(date -u +%FT%TZ)"; nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'; } >>"$summary"

step unet_1 bench "$unet" "${common[@]}" --set bench.members=1 --set bench.repeats=3 \
    --set "bench.methods=$methods"
for members in 1 "$big"; do
    # the plan the auto run below makes for itself: the same settings, its table kept
    step "plan_$members" plan "$unet" --ranks 1 "${common[@]}" --set sampler.method=auto \
        --set "ensemble.members=$members" --json "$out/plan_$members.json"
    step "sample_${members}_auto" sample "$unet" "${common[@]}" --set sampler.method=auto \
        --set "ensemble.members=$members" --set output.overwrite=true \
        --set "output.path=\"$out/auto_$members.zarr\""
    step "sample_${members}_seq" sample "$unet" "${common[@]}" \
        --set sampler.method=sequential-sde --set sampler.theta=j_max \
        --set "ensemble.members=$members" \
        --set "ensemble.batch_size=$members" --set output.overwrite=true \
        --set "output.path=\"$out/seq_$members.zarr\""
done
step "unet_$wide" bench "$unet" "${common[@]}" --set "bench.members=$wide" --set bench.repeats=3 \
    --set "bench.methods=$methods"
# two calibration members: four 2048x2048 windows at once would not fit beside the others
step grf bench "$grf" "${common[@]}" --set calibrate.members=2 --set bench.members=1 --set bench.repeats=3 \
    --set "bench.methods=$methods" --set "bench.sizes=$grf_sizes"
if [ -n "${PIADM_GPU_QUICK:-}" ]; then
    echo "== scale: skipped (PIADM_GPU_QUICK)" | tee -a "$summary"
elif command -v mpiexec >/dev/null; then
    # 8 ranks first: the rows that decide the most, should the timeout cut the rest (7 runs)
    echo "== scale: bash jobs/local/scale_bench.sh $out/scale 8 4 2 1" | tee -a "$summary"
    timeout "$((2 * limit))" bash jobs/local/scale_bench.sh "$out/scale" 8 4 2 1 >/dev/null 2>&1
    echo "   rc $?" | tee -a "$summary"
    cat "$out/scale/summary.txt" >>"$summary" 2>/dev/null
else
    echo "== scale: skipped (no mpiexec on PATH: pip install mpich)" | tee -a "$summary"
fi
echo "done: $summary"
