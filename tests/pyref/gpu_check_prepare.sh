#!/usr/bin/env bash
# Fills .gpu/ and .gl/ on the build machine for the GPU check (tests/pyref/gpu_check.sh), then
# prints what the lent machine's call will carry (the working tree that travels is limited to
# 64 MiB in all, tracked files included).
#
#   bash tests/pyref/gpu_check_prepare.sh [--no-build] [--features wgpu|cuda|...] [--torch VERSION]
#
# - .gpu/decorr: `cargo build --release --locked -p decorr-cli --features vulkan,tch` (wgpu, Vulkan and
#   LibTorch), stripped. The tch part links the libtorch of PyTorch VERSION (default 2.11.0: the
#   lent machines' python3 has torch 2.11.0+cu130, and libtorch's C++ symbols change between
#   releases, so the binary must be built against the version it will load there, not the 2.9.0
#   the bindings name; LIBTORCH_BYPASS_VERSION_CHECK lets them build against it). PyTorch VERSION is
#   installed here into ~/.cache/decorr/torch-VERSION (reused); gpu_check.sh points the loader at
#   the machine's own torch/lib. `--features vulkan` alone leaves LibTorch out.
#   (--no-build takes target/release/decorr as it is). If the carried total would pass 64 MiB
#   it is xz-compressed to .gpu/decorr.xz instead (gpu_check.sh unpacks it to /tmp).
# - .gpu/whl/: diffusers 0.42.1 (the version our fixtures were made with) and the pure-Python
#   packages it needs that the lent machine lacks (it has torch, transformers, safetensors,
#   accelerate, huggingface_hub, numpy, pillow, regex, requests, filelock, httpx).
# - .gl/: the Vulkan loader (and the GL dispatch libraries) as amd64 Debian packages, unpacked
#   there only when the machine has no libvulkan.
# Both folders are added to .git/info/exclude. Then, with the device tool:
#   run(command="bash tests/pyref/gpu_check.sh", carry=[".gpu", ".gl"], timeout_s=540)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

build=1
features=vulkan,tch
torch_version=2.11.0
while [ $# -gt 0 ]; do
    case "$1" in
        --no-build) build=0 ;;
        --features) features=$2; shift ;;
        --torch) torch_version=$2; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for p in /.gpu/ /.gl/; do
    grep -qxF "$p" "$exclude" 2>/dev/null || echo "$p" >>"$exclude"
done

# 1. the binary
if [ "$build" = 1 ]; then
    if [[ ",$features," == *,tch,* ]]; then
        venv="$HOME/.cache/decorr/torch-$torch_version"
        if ! "$venv/bin/python" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$torch_version')" 2>/dev/null; then
            rm -rf "$venv"
            python3 -m venv "$venv"
            "$venv/bin/python" -m pip install --quiet "torch==$torch_version"
        fi
        export LIBTORCH_USE_PYTORCH=1 VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH"
        [ "$torch_version" = 2.9.0 ] || export LIBTORCH_BYPASS_VERSION_CHECK=1
    fi
    cargo build --release --locked -p decorr-cli --features "$features"
fi
mkdir -p .gpu
rm -f .gpu/decorr .gpu/decorr.xz
cp target/release/decorr .gpu/decorr
strip .gpu/decorr
file .gpu/decorr 2>/dev/null || true

# 2. the wheels (Python 3.12 on x86-64 there; no network there)
rm -rf .gpu/whl
mkdir -p .gpu/whl
wheels=(
    diffusers==0.42.1
    importlib_metadata==10.2.0 # diffusers' one need the machine lacks
    zipp==4.1.2                # importlib_metadata's
    lazy-importer==0.1.0       # importlib_metadata's (Python < 3.15)
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d .gpu/whl "${wheels[@]}"
echo "diffusers needs (extras left out):"
unzip -p .gpu/whl/diffusers-*.whl '*/METADATA' | grep ^Requires-Dist | grep -v extra || true

# 3. the Vulkan loader
o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
rm -rf .gl
mkdir -p .gl /tmp/amd64/partial
# shellcheck disable=SC2086
apt-get $o update -qq
# shellcheck disable=SC2086
(cd .gl && apt-get $o download -qq libvulkan1 libglvnd0 libegl1 libgl1 libglx0 libopengl0 libgles2)

# 4. what travels
size() { du -cb --apparent-size "$@" 2>/dev/null | tail -n 1 | cut -f 1; }
tree_bytes() { # tracked and untracked-not-ignored files: what travels besides the carried paths
    git ls-files -z -co --exclude-standard | xargs -0 du -cb --apparent-size 2>/dev/null \
        | awk '$2 == "total" { s += $1 } END { print s + 0 }'
}
limit=$((64 * 1024 * 1024))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
tree=$(tree_bytes)
total=$((tree + $(size .gpu) + $(size .gl)))
if [ "$total" -gt "$limit" ]; then
    echo "over 64 MiB with the plain binary ($(mib "$total")): compressing it to .gpu/decorr.xz"
    xz -9 -T0 .gpu/decorr
    total=$((tree + $(size .gpu) + $(size .gl)))
fi
echo
ls -l .gpu .gpu/whl .gl
echo "working tree (tracked + untracked, not ignored): $(mib "$tree")"
echo ".gpu: $(mib "$(size .gpu)")   .gl: $(mib "$(size .gl)")"
echo "carried in all: $(mib "$total") of 64 MiB"
if [ "$total" -gt "$limit" ]; then
    echo "TOO LARGE: the device call would be refused" >&2
    exit 1
fi
