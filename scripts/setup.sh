#!/usr/bin/env bash
# Fresh-machine setup for mixpipe: system libraries, a venv in .venv, and every Python dependency.
#
# Idempotent: a second run with everything in place only checks a stamp and returns in seconds.
# Order matters and is deliberate:
#   1. torch==2.13.0 first, pinned, so no later requirement can make pip fetch a multi-GB CUDA
#      build (a GPU user installs their own CUDA torch instead; pyproject only asks for a range).
#   2. numpy before ffcv, and ffcv with --no-build-isolation: its build compiles against the
#      installed numpy and the system's OpenCV / libturbojpeg found through pkg-config.
#   3. pillow explicitly: ffcv 1.0.2 uses it without declaring it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MIXPIPE_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
STAMP="$VENV/.mixpipe-setup-stamp"

log() { printf '[setup] %s\n' "$*" >&2; }

APT_PACKAGES=(pkg-config libopencv-dev libturbojpeg0-dev dataset-fashion-mnist)

install_system_packages() {
    local missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        log "missing Debian packages: ${missing[*]}"
        log "run as root or install them: sudo apt-get install ${missing[*]}"
        exit 1
    fi
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

setup_fingerprint() {
    # Everything that decides what gets installed: a change to any of these re-runs pip.
    cat "$ROOT/scripts/setup.sh" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1
}

install_python_packages() {
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating venv at $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    local pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
    log "installing torch==$TORCH_VERSION (CPU build where a local wheel exists)"
    "${pip[@]}" "torch==$TORCH_VERSION"
    log "installing numpy, pillow, DALI, pyzmq, test tools"
    "${pip[@]}" "setuptools>=68" wheel numpy pillow nvidia-dali-cuda120 pyzmq tqdm matplotlib pytest hypothesis \
        "torch==$TORCH_VERSION"
    if ! "$VENV/bin/python" -c "import ffcv" 2>/dev/null; then
        log "building ffcv==1.0.2 against system OpenCV/libturbojpeg (takes a minute)"
        "${pip[@]}" --no-build-isolation ffcv==1.0.2 "torch==$TORCH_VERSION"
    fi
    log "installing mixpipe (editable)"
    "${pip[@]}" --no-build-isolation --no-deps -e "$ROOT"
    # Resolve the package's declared dependencies against what is already there (installs nothing
    # new when the pins above satisfy them; fails loudly if they conflict).
    "${pip[@]}" -e "$ROOT[server,dev,bench]" "torch==$TORCH_VERSION"
}

main() {
    install_system_packages
    local fingerprint
    fingerprint="$(setup_fingerprint)"
    # find_spec, not import: proves the packages are there without paying for importing them.
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$fingerprint" ] \
        && "$VENV/bin/python" -c "
import importlib.util, sys
sys.exit(any(importlib.util.find_spec(m) is None
             for m in ('mixpipe', 'torch', 'nvidia.dali', 'ffcv', 'zmq', 'pytest', 'hypothesis')))
" 2>/dev/null; then
        log "environment up to date ($VENV)"
        return 0
    fi
    install_python_packages
    "$VENV/bin/python" -c "import mixpipe, torch, nvidia.dali, ffcv, zmq; print('[setup] ok: torch', torch.__version__)"
    echo "$fingerprint" > "$STAMP"
}

main "$@"
