#!/usr/bin/env bash
# The GPU check's entry point on a lent NVIDIA machine: decorr against diffusers on
# random full-size SD 1.5, per-step times, totals, peak memory and the images' max difference.
#
#   here:   bash tests/pyref/gpu_check_prepare.sh          # fills .gpu/ and .gl/ (ignored)
#   there:  bash tests/pyref/gpu_check.sh [gpu_check.py options, e.g. --steps 20]
#           (run from the repo root with carry [".gpu", ".gl"]; OUT defaults to ./gpu-check-out)
#   DisenDiff's GPU time, a second call: ... gpu_check.sh --configs vulkan:f16 --disendiff-steps 3
#   LibTorch beside Vulkan: ... gpu_check.sh --configs tch:f16,vulkan:f16,tch:f32 --disendiff-steps 3
#
# It installs the carried wheels (.gpu/whl: diffusers and what the machine lacks) into
# /tmp/site, makes Vulkan reachable (the loader from .gl/*.deb when the machine has none; the
# NVIDIA ICD file when the driver's folder has it), prints the GPU, and runs
# tests/pyref/gpu_check.py with the carried binary (.gpu/decorr, or .gpu/decorr.xz unpacked),
# writing $OUT/gpu-check.json, the PNGs and this log ($OUT/gpu-check.log). gpu_check.py keeps
# itself within --budget-s (450 s by default), so the whole run stays under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-./gpu-check-out}
mkdir -p "$OUT" || exit 1

main() {
    echo "gpu_check.sh: $(date -u +%FT%TZ) on $(uname -srm), in $(pwd)"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi -L
    else
        echo "no nvidia-smi: GPU memory will read n/a"
    fi

    # Python: the carried wheels (no network there).
    if compgen -G ".gpu/whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .gpu/whl/*.whl || { echo "wheel install failed"; return 1; }
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "no .gpu/whl/*.whl: using the machine's Python packages as they are"
    fi
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
    python3 -c 'import sys, torch, diffusers, transformers
print("python", sys.version.split()[0], "torch", torch.__version__,
      "cuda", torch.cuda.is_available(), "diffusers", diffusers.__version__,
      "transformers", transformers.__version__)' || { echo "diffusers does not import"; return 1; }

    # Vulkan: the loader, and NVIDIA's ICD.
    if ! ldconfig -p | grep -q libvulkan; then
        if compgen -G ".gl/*.deb" >/dev/null; then
            echo "no libvulkan on this machine: unpacking .gl/*.deb"
            for f in .gl/*.deb; do dpkg -x "$f" /; done
            ldconfig
        else
            echo "no libvulkan on this machine and no .gl/*.deb: wgpu will find no Vulkan"
        fi
    fi
    ldconfig -p | grep libvulkan | head -n 2
    icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
    if [ -f "$icd" ]; then
        export VK_DRIVER_FILES=$icd
        echo "VK_DRIVER_FILES=$icd"
    fi

    # The decorr binary built on our machine.
    decorr=.gpu/decorr
    if [ ! -x "$decorr" ] && [ -f .gpu/decorr.xz ]; then
        decorr=/tmp/decorr
        python3 -c 'import lzma, shutil, sys
shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' .gpu/decorr.xz "$decorr" \
            && chmod +x "$decorr"
    fi
    # A tch build loads libtorch: the machine's own (the version it was built against, see
    # gpu_check_prepare.sh), found through python3's torch.
    if [ -x "$decorr" ] && ldd "$decorr" 2>/dev/null | grep -q libtorch; then
        torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
        export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "tch build: libtorch from $torch_lib"
        ldd "$decorr" | grep -E "libtorch|libc10" || true
    fi
    if [ -x "$decorr" ]; then
        "$decorr" --version || true
    else
        echo "no .gpu/decorr: run tests/pyref/gpu_check_prepare.sh on the build machine first"
    fi

    python3 tests/pyref/gpu_check.py --decorr "$decorr" \
        --json "$OUT/gpu-check.json" --out-dir "$OUT" "$@"
}

main "$@" 2>&1 | tee "$OUT/gpu-check.log"
exit "${PIPESTATUS[0]}"
