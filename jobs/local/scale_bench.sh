#!/usr/bin/env bash
# The README's scale-out table on an emulated accelerator ("Scale-out on an emulated
# accelerator"): GRF 32x32, 1000 steps, 1 member, `model.emulate_ms = [5, 1]` (a call of n
# items lasts 5 + n ms), sequential-ode against pc-window-ode (p = 96, tol 1.5e-5) on 1, 2, 4
# and 8 ranks in a row, each under mpiexec, min of 3 repeats; on several ranks pc-window-ode
# runs again with the whole window on every rank (sampler.window_split = "replicated"). The
# model runs on the CPU (any GPU hidden); emulated calls sleep, so ranks share cores, but the
# communication shares are only clean with a core per rank.
#   bash jobs/local/scale_bench.sh [OUTDIR] [RANKS ...]   (default out/scale, 1 2 4 8)
# Each rank count's log and JSON go to OUTDIR; summary.txt gathers the rows and the
# collectives lines (time in collectives, their own, and waiting for other ranks' model calls).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out="${1:-out/scale}"
shift $(($# > 0 ? 1 : 0))
ranks=("$@")
[ ${#ranks[@]} -gt 0 ] || ranks=(1 2 4 8)
source jobs/common.sh
for n in "${ranks[@]}"; do
    is_count "$n" || { echo "scale_bench: rank count '$n' is not a positive whole number" >&2; exit 2; }
done
command -v mpiexec >/dev/null || { echo "scale_bench: no mpiexec on PATH (pip install mpich)" >&2; exit 2; }
mkdir -p "$out"
summary="$out/summary.txt"
# every core of the machine (nproc would count OMP_NUM_THREADS)
echo "# piadm scale-out, $(date -u +%FT%TZ), $(getconf _NPROCESSORS_ONLN) cores" >>"$summary"
export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1
rc=0
for n in "${ranks[@]}"; do
    # the window split over the ranks' slots, then (on several ranks) replicated on each
    splits=(slots)
    [ "$n" -eq 1 ] || splits+=(replicated)
    for split in "${splits[@]}"; do
        name="ranks_$n" methods='["sequential-ode", "pc-window-ode"]'
        if [ "$split" = replicated ]; then
            name="ranks_${n}_replicated" methods='["pc-window-ode"]'
        fi
        status=0
        mpiexec -n "$n" "${piadm[@]}" bench jobs/configs/grf.toml --json "$out/$name.json" \
            --set 'model.shape=[32, 32]' --set 'model.emulate_ms=[5, 1]' --set bench.members=1 \
            --set bench.repeats=3 --set sampler.tol=1.5e-5 --set sampler.window=96 \
            --set "sampler.window_split=$split" --set 'bench.sizes=[[32, 32]]' \
            --set "bench.methods=$methods" </dev/null >"$out/$name.log" 2>&1 || status=$?
        [ "$status" -eq 0 ] || rc=$status
        echo "== $n ranks, window split $split: rc $status" | tee -a "$summary"
        grep -E '^(\[rank 0/[0-9]+\] )?method |(sequential-ode|pc-window-ode) +[0-9]|collectives:' \
            "$out/$name.log" \
            | tee -a "$summary"
    done
done
exit "$rc"
