#!/usr/bin/env bash
# The README's two commands, each doing its own set-up on a fresh clone:
#
#   ./run.sh train [sppo-fast train options]   the main job (SPPO on the bundled task, on the CPU)
#   ./run.sh test  [pytest options]            the whole test suite, peer tests included
#
# The first call creates .venv, installs the pinned CPU torch, the package and (for `test`) the peer
# packages, and builds the native kernels; later calls find a stamp that matches the packaging files and
# the C++ sources and go straight to the work. Any other word runs the `sppo-fast` command of the venv
# (`./run.sh compare`, `./run.sh bench --quick`, `./run.sh info`). Those who manage their own environment
# can still `pip install -e .` as usual (README, "Install").
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${SPPO_FAST_VENV:-.venv}
TORCH=torch==2.13.0  # pinned: an unpinned torch pulls a CUDA build of several GB
# A guard only: the checkout has no top-level package that could shadow an installed one (the Triton kernels
# live in sppo_fast/kernels/; a top-level kernels/ once hid Hugging Face's `kernels`), but every `python -m`
# process started here (pytest, compare's runs) would otherwise put the checkout first on sys.path, where a
# future top-level directory could do it again (Python >= 3.11).
export PYTHONSAFEPATH=1

usage() {
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

# Everything that changes what gets installed or built; a change re-runs the set-up.
fingerprint() {
    cat pyproject.toml setup.py run.sh csrc/* 2>/dev/null | sha256sum | cut -c1-16
}

LOG=$VENV/setup.log  # the set-up's pip/setuptools/compiler output; shown only when a step fails

pip_install() {
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"
}

# One line per set-up step; the step's output goes to $LOG, and to the terminal only if the step fails.
step() {  # $1: what it does; the rest: the command
    local what=$1 from
    shift
    echo "run.sh: $what" >&2
    from=$(($(wc -l <"$LOG") + 1))
    if ! "$@" >>"$LOG" 2>&1; then
        echo "run.sh: failed: $what; its output (all of it in $LOG):" >&2
        tail -n "+$from" "$LOG" | tail -n 200 >&2
        exit 1
    fi
}

setup_env() {  # $1: core | peers
    local profile=$1 stamp="$VENV/.sppo-fast-$1" want
    want=$(fingerprint)
    if [[ -f $stamp && $(cat "$stamp") == "$want" ]] && "$VENV/bin/python" -c "import sppo_fast" 2>/dev/null; then
        return
    fi
    echo "run.sh: setting up $VENV ($profile); this happens once and takes a few minutes (log: $LOG)" >&2
    mkdir -p "$VENV"
    : >"$LOG"
    [[ -x $VENV/bin/python ]] || step "creating the virtual environment" "$PYTHON" -m venv "$VENV"
    step "upgrading pip" pip_install --upgrade pip
    step "installing $TORCH (CPU) and the build tools" pip_install "$TORCH" setuptools wheel ninja pybind11
    local extras=dev
    [[ $profile == peers ]] && extras=dev,peers
    # --no-build-isolation: the native kernels build against the torch installed above
    step "installing sppo-fast [$extras] and building its native kernels" \
        pip_install "$TORCH" --no-build-isolation -e ".[$extras]"
    if [[ $profile == peers ]]; then
        # verl's full dependency set does not resolve beside our pins; its loss module needs only these
        step "installing verl (its loss module only)" pip_install "$TORCH" --no-deps verl==0.9.1
        step "installing verl's imports" pip_install "$TORCH" packaging ray tensordict omegaconf codetiming orjson
        # Megatron's vocab-parallel cross-entropy: a baseline of the vocab-parallel benchmark and what verl's
        # Megatron log-prob functions call (tests/test_integration_verl.py runs them on gloo)
        step "installing megatron-core" pip_install "$TORCH" megatron-core==0.16.1
    fi
    step "checking the install" "$VENV/bin/python" -c "import sppo_fast; sppo_fast.backend_info()"
    "$VENV/bin/python" -c "import sppo_fast; print('run.sh: ready:', '; '.join(f'{k}: {v}' for k, v in sppo_fast.backend_info().items()))" >&2 2>>"$LOG"
    echo "$want" > "$stamp"
    # the peer set-up includes the core one
    [[ $profile == peers ]] && echo "$want" > "$VENV/.sppo-fast-core"
    return 0
}

cmd=${1:-}
[[ -z $cmd ]] && usage 2
shift
case $cmd in
    -h|--help|help) usage 0 ;;
    test)
        setup_env peers
        # the README's test command, inside the venv
        exec "$VENV/bin/python" -m pytest -q "$@" ;;
    setup)
        setup_env "${1:-peers}" ;;
    *)
        if [[ -f $VENV/.sppo-fast-peers ]]; then setup_env peers; else setup_env core; fi
        exec "$VENV/bin/sppo-fast" "$cmd" "$@" ;;
esac
