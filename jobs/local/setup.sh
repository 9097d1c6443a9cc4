#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv (idempotent, torch pinned), and
# put it first on PATH. Sourced by demo.sh and test.sh, or by your own shell: the set-up runs
# in a subshell with its own strict options, so the calling shell keeps its own (a sourced
# `set -e` would end an interactive shell at its next failing command); only PATH changes.
# PIADM_VENV overrides the location; PIADM_TORCH_INDEX is an index to take torch from (e.g.
# https://download.pytorch.org/whl/cpu where pip reaches PyPI, whose Linux torch bundles CUDA).
_piadm_venv="${PIADM_VENV:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/.venv}"
# (not `if ( ... )`: bash ignores set -e inside a tested command, subshells included)
(
    set -euo pipefail
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
    # a link to the venv (another folder's, say) is where it points: venv will not create a link
    venv="$(python3 -c 'import os, sys; print(os.path.realpath(sys.argv[1]))' "$_piadm_venv")"
    stamp="$venv/.piadm-setup"
    # the files' contents and this checkout's path (sha256sum prints it): the editable install
    # points at one checkout, so a venv another checkout made is set up again for this one
    want="$(sha256sum "$root/pyproject.toml" "$root/jobs/local/setup.sh" | sha256sum | cut -c1-16)"
    if [ ! -f "$stamp" ] || [ "$(head -n 1 "$stamp")" != "$want" ]; then
        echo "setting up $venv (first run takes a few minutes)" >&2
        before="$(sed -n 2p "$stamp" 2>/dev/null || true)"
        if [ -n "$before" ] && [ "$before" != "$root" ] && [ -d "$before" ]; then
            echo "  (it was set up for the checkout $before: its piadm will run this checkout's" \
                 "code until that checkout sets it up again; give each checkout its own" \
                 "PIADM_VENV to keep them apart)" >&2
        fi
        t0=$SECONDS
        echo "  [1/4] creating the virtual environment" >&2
        python3 -m venv "$venv"
        echo "  [2/4] upgrading pip" >&2
        "$venv/bin/python" -m pip install -q --upgrade pip
        # torch is pinned here, not in pyproject: an unpinned torch pulls a multi-GB CUDA build
        echo "  [3/4] installing torch 2.13.0 (the longest step)" >&2
        "$venv/bin/python" -m pip install -q ${PIADM_TORCH_INDEX:+--index-url "$PIADM_TORCH_INDEX"} \
            "torch==2.13.0"
        echo "  [4/4] installing piadm with MPI (mpi4py, mpich), test and bench extras" >&2
        "$venv/bin/python" -m pip install -q -e "$root[mpi,dev,bench]"
        printf '%s\n%s\n' "$want" "$root" > "$stamp"
        echo "  $venv is ready ($((SECONDS - t0)) s)" >&2
    fi
)
_piadm_rc=$?  # a calling script with set -e has stopped already
if [ "$_piadm_rc" = 0 ]; then
    export PATH="$_piadm_venv/bin:$PATH"
    unset _piadm_venv _piadm_rc
else
    echo "piadm: setting up $_piadm_venv failed (see above)" >&2
    unset _piadm_venv _piadm_rc
    return 1 2>/dev/null || exit 1
fi
