#!/usr/bin/env bash
# Create one virtual environment per peer library under bench/.peers/<name> (never in .venv).
#
# Idempotent: an environment whose stamp file names the same pins is left alone; one that failed
# half-way, or was made with other pins, is rebuilt. Each gets the CPU build of torch (the local
# wheel where pip is configured with one), the peer pinned exactly, and transformers pinned (the
# version in requirements.lock where the peer accepts it). `pip freeze` goes to
# bench/.peers/<name>/versions.txt. A peer that cannot be installed leaves the last lines of pip's
# error in bench/.peers/<name>/install-error.txt, which the benchmarks report instead of a number;
# the script still exits 0 then (so `make bench` goes on and records the reason), unless
# STRICT=1 is set.
#
#     bash bench/peers/setup.sh                # all peers
#     bash bench/peers/setup.sh repeng nnsight # some of them
set -u
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
ROOT=bench/.peers
TORCH="torch==2.13.0"
TRANSFORMERS="transformers==5.23.0" # the version in requirements.lock

# name -> the packages pinned for it (besides torch)
declare -A PACKAGES=(
    [repeng]="repeng==0.4.0 $TRANSFORMERS"
    # steering-vectors 0.12.2 requires transformers<5 (pip: ResolutionImpossible with 5.23.0)
    [steering-vectors]="steering-vectors==0.12.2 transformers==4.57.6"
    # HookedTransformer was removed in TransformerLens 4.0; 3.9.0 is the last release with it.
    [transformer-lens]="transformer-lens==3.9.0 $TRANSFORMERS"
    # TransformerLens 4.x: TransformerBridge, the replacement for HookedTransformer
    [transformer-lens-4]="transformer-lens==4.3.0 $TRANSFORMERS"
    [nnsight]="nnsight==0.8.1 $TRANSFORMERS"
)
ORDER=(repeng steering-vectors transformer-lens transformer-lens-4 nnsight)

if [ $# -gt 0 ]; then ORDER=("$@"); fi
mkdir -p "$ROOT"
status=0
for name in "${ORDER[@]}"; do
    if [ -z "${PACKAGES[$name]+x}" ]; then
        echo "unknown peer '$name' (known: ${!PACKAGES[*]})" >&2
        status=1
        continue
    fi
    env="$ROOT/$name"
    wanted="$TORCH ${PACKAGES[$name]}"
    if [ -f "$env/.installed" ] && [ "$(cat "$env/.installed")" = "$wanted" ]; then
        echo "[peers] $name: ready ($env)"
        continue
    fi
    echo "[peers] $name: creating $env"
    rm -rf "$env"
    "$PYTHON" -m venv "$env"
    pip=("$env/bin/python" -m pip --disable-pip-version-check -q)
    log="$env/install.log"
    # shellcheck disable=SC2086
    if "${pip[@]}" install "$TORCH" >"$log" 2>&1 &&
        "${pip[@]}" install "$TORCH" ${PACKAGES[$name]} >>"$log" 2>&1; then
        if ! "$env/bin/python" -c "import sys, torch; sys.exit('+cpu' not in torch.__version__)"; then
            echo "[peers] $name: warning: torch is not the +cpu build" >&2
        fi
        "${pip[@]}" freeze >"$env/versions.txt"
        rm -f "$env/install-error.txt"
        echo "$wanted" >"$env/.installed"
        echo "[peers] $name: installed ($(grep -i -E "^(${PACKAGES[$name]%%==*})==" "$env/versions.txt"))"
    else
        grep -v -e '^\s*$' -e '^WARNING: Location' "$log" | tail -n 3 >"$env/install-error.txt"
        echo "[peers] $name: install FAILED: $(tail -n 1 "$env/install-error.txt")" >&2
        status=1
    fi
done
if [ "$status" -ne 0 ]; then
    echo "[peers] some peers are not available; the benchmarks will report null with the reason" >&2
fi
if [ "${STRICT:-0}" = "1" ]; then exit $status; fi
exit 0
