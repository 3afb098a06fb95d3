#!/usr/bin/env bash
# The GPU benchmark of issue "Fast on the GPU": random-weight DiT-XL/2 (256px, batch 2,
# fp16) built with the torch backend (torch.export programs traced on the GPU, one CUDA
# graph per graph), 250 steps at N=1,3,5, the diffusers eager baseline, one table.
#
#   tools/gpu_bench.sh [OUT_DIR]      # default ./gpu-bench; writes bench.json, bench.png, log.txt
#
# Needs a CUDA GPU, torch, onnx, onnxscript, click, rich and diffusers. Packages missing on a
# bare machine can travel as wheels in ./.whl (see the device README): they are installed
# into a private target first. Nothing is installed into the system.
# Environment knobs: PYTHON, STEPS (250), INTERVALS (1,3,5), REPEATS (3), MODEL (demo-dit-xl),
# ENGINE_DIR (where the build goes; default OUT_DIR/engine).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-./gpu-bench}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"

PY="${PYTHON:-python3}"
# shellcheck source=tools/gpu_env.sh
source "$ROOT/tools/gpu_env.sh"
export PYTHONUNBUFFERED=1
FORA=("$PY" -m fora_export.cli)

"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU visible")'
ENGINE="${ENGINE_DIR:-$OUT/engine}"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
    time "${FORA[@]}" -v build "${MODEL:-demo-dit-xl}" --out "$ENGINE" --force --precision fp16 \
        --batch 2:2:2 --backend torch --device cuda
    # --trust: torch programs run code when loaded; this script built the folder just above.
    "${FORA[@]}" bench "$ENGINE" --backend torch --trust --steps "${STEPS:-250}" --intervals "${INTERVALS:-1,3,5}" \
        --repeats "${REPEATS:-5}" --plot "$OUT/bench.png" --save-json "$OUT/bench.json"
} 2>&1 | tee "$OUT/log.txt"
echo "wrote $OUT/log.txt, $OUT/bench.png, $OUT/bench.json"
