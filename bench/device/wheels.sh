#!/usr/bin/env bash
# Here, before a device call: the Python packages lrkit needs that the device image lacks, as .whl/ in the
# repository root (ignored by git; name it in the call's `carry`). The image has torch, transformers, peft,
# lightning, accelerate, safetensors, torchmetrics, pillow and pyyaml (Python 3.12); it lacks diffusers,
# jsonargparse (with its signature extras) and bitsandbytes. bitsandbytes' wheel (43 MB, a native library per
# CUDA version) does not fit the 64 MiB a call carries beside the repository, so .whl/site/ gets its package with
# the library for the image's CUDA 13.0 only (about 5 MB), put on PYTHONPATH there as it is.
#
#   bash bench/device/wheels.sh      # then: run(command="bash bench/device/session.sh ...", carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
rm -rf .whl && mkdir -p .whl/site
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
download() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$1" "${@:2}"
}
download .whl "diffusers==$(python3 -c 'import diffusers; print(diffusers.__version__)')" \
    "jsonargparse==$(python3 -c 'import jsonargparse; print(jsonargparse.__version__)')" \
    docstring-parser typeshed-client
tmp=$(mktemp -d)
download "$tmp" "bitsandbytes==$(python3 -c 'import bitsandbytes; print(bitsandbytes.__version__)')"
python3 - "$tmp"/bitsandbytes-*.whl .whl/site <<'PY'
import sys, zipfile
wheel, site = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        native = name.rsplit("/", 1)[-1].startswith("libbitsandbytes_")
        if not native or name.endswith(("_cuda130.so", "_cpu.so")):
            z.extract(name, site)
PY
rm -rf "$tmp"
du -sh .whl
