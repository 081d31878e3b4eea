#!/usr/bin/env bash
# The CPU benchmark suite: ours against the original VisCPM in the same run, as ratios (issue 8's CPU figures).
# Each script prints its table; copies go to build/benchmarks/. Run it in the test environment:
#     bash .ci/run bash benchmarks/run_cpu.sh
# It takes about 15 minutes on 2 cores; nothing here asserts on timing. Results: benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out=build/benchmarks
mkdir -p "$out"
python benchmarks/bench_cpmbee_decode.py --decode-modes dynamic static compile "$@" | tee "$out/cpmbee_decode.txt"
python benchmarks/bench_cpmbee_decode.py --cache decoder --beam-tokens 0 "$@" | tee "$out/cpmbee_decode_static_step.txt"
python benchmarks/bench_chat.py | tee "$out/chat.txt"
python benchmarks/bench_chat.py --decode-mode static | tee "$out/chat_static.txt"
python benchmarks/bench_paint.py | tee "$out/paint.txt"
