#!/usr/bin/env bash
# Issue 8's GPU table (benchmarks/bench_gpu.py) on the device machine, which has no internet and whose image has
# torch 2.11 (cu130), accelerate, timm, torchvision, opencv, huggingface_hub, tokenizers and safetensors, but not the
# transformers / diffusers / peft versions this package needs, nor the original VisCPM and its torchscale / fairscale.
#
#   bash benchmarks/gpu_run.sh wheels   # here: fetch those wheels for CPython 3.12 into .whl/ (git-ignored), ~29 MB
#   bash benchmarks/gpu_run.sh device   # there: install them, this package (editable), and run the benchmark
#
# The device call (the working tree plus .whl travel; the table comes back as $OUT/bench_gpu.json and .log):
#   run(command="bash benchmarks/gpu_run.sh device", carry=[".whl"], timeout_s=590)
# BENCH_ARGS adds arguments, e.g. BENCH_ARGS="--sections chat" or "--tiny" for a one-minute smoke run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

case "${1:-}" in
wheels)
    grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    git check-ignore -q .whl/probe.whl || { echo ".whl/ is not ignored by git: refusing to fill it" >&2; exit 1; }
    rm -rf .whl && mkdir .whl
    platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
               --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
    # The versions this repo's tests run with; regex, importlib_metadata and setuptools<81 (the original imports
    # pkg_resources) in case the image's are too old or too new. The GPU image's own torch is kept.
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl transformers==5.24.0 diffusers==0.42.1 peft==0.21.2 VisCPM==0.0.1.dev0 \
        torchscale==0.3.0 importlib_metadata regex "setuptools<81" bitsandbytes==0.50.2
    # fairscale 0.4.0 (imported by torchscale) is a source release only: build its pure-Python wheel here.
    src="$(mktemp -d)"
    python3 -m pip download -q --no-deps --no-binary=:all: -d "$src" fairscale==0.4.0
    python3 -m pip wheel -q --no-deps -w .whl "$src"/fairscale-0.4.0.tar.gz
    rm -rf "$src"
    # bitsandbytes ships a library per CUDA/ROCm/XPU version (43 MB): keep the CUDA 13 ones (the image's torch is
    # cu130) and the CPU one, so that everything fits the 64 MiB a device call carries.
    python3 - .whl/bitsandbytes-*.whl <<'EOF'
import re, sys, zipfile
path = sys.argv[1]
drop = re.compile(r"bitsandbytes/libbitsandbytes_(?!cuda13|cpu)\w+\.(so|dll|dylib)$")
with zipfile.ZipFile(path) as src:
    items = [(info, src.read(info)) for info in src.infolist() if not drop.search(info.filename)]
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
    for info, data in items:
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line + b"\n" for line in data.splitlines()
                            if not drop.search(line.split(b",")[0].decode()))
        out.writestr(info, data)
EOF
    ls -l .whl
    du -ch .whl/*.whl | tail -1
    ;;
device)
    [ -d .whl ] || { echo "no .whl/: run 'bash benchmarks/gpu_run.sh wheels' here first and carry .whl" >&2; exit 1; }
    OUT="${OUT:-$(mktemp -d)}"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
    python3 -c "import sys; sys.path.insert(0, 'tests'); import viscpm, oracle; print('imports ok')"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    set -o pipefail
    # The script keeps to --time-limit (420 s by default) except for a compile it has started; the timeout is the
    # backstop (the JSON is rewritten at every new figure, so a stopped run keeps what it measured).
    timeout 560 python3 benchmarks/bench_gpu.py --out "$OUT/bench_gpu.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_gpu.log"
    ;;
*)
    echo "usage: bash benchmarks/gpu_run.sh wheels|device" >&2
    exit 2
    ;;
esac
