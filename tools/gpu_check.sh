#!/usr/bin/env bash
# One command for a GPU machine: environment, GPU/TensorRT tests, benchmark -> one report.
#
#   tools/gpu_check.sh [REPORT]        # REPORT defaults to ./gpu_report.txt
#
# Steps (each runs even when an earlier one failed):
#   1. environment: python, torch/CUDA, GPU, tensorrt, onnxruntime versions, nvidia-smi
#   2. pytest -m "gpu or tensorrt" -rs   (every test marked gpu or tensorrt that exists)
#   3. when the CLI has `bench`: fora-export build $FORA_BUILD_ARGS (default "demo-dit") into a
#      scratch folder, then fora-export bench on it with ONNX Runtime, and with TensorRT when the
#      folder has TensorRT engines ($FORA_BENCH_ARGS, default "--steps 20")
# The whole output goes to REPORT; a summary is printed at the end. Exit status is
# non-zero when any step failed. Environment knobs:
#   PYTHON           interpreter (default: .venv/bin/python if present, else python3)
#   PYTEST_ARGS      extra pytest arguments (e.g. "-x -k trt")
#   FORA_BUILD_ARGS  MODEL and options for the benchmark's `fora-export build` (default: demo-dit)
#   FORA_BENCH_ARGS  options for `fora-export bench` (default: --steps 20)
# Wheels in ./.whl (e.g. diffusers, which the lent GPU machine lacks) are installed into
# /tmp/fora-site first.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPORT="${1:-./gpu_report.txt}"
REPORT="$(cd "$(dirname "$REPORT")" && pwd)/$(basename "$REPORT")"
cd "$ROOT"

if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
    PY="$ROOT/.venv/bin/python"
else
    PY="$(command -v python3 || command -v python || echo python3)"
fi
# shellcheck source=tools/gpu_env.sh
source "$ROOT/tools/gpu_env.sh"

SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
declare -a SUMMARY=()
FAILED=0

: >"$REPORT"
{
    echo "fora-export GPU check"
    echo "date:   $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host:   $(hostname 2>/dev/null || echo '?')"
    echo "commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (dirty)')"
    echo "python: $PY"
} >>"$REPORT"

# run_step NAME CMD...: run CMD with errexit off, log it, record PASS / FAIL (rc) / SKIP.
# Exit status 5 (pytest: no tests collected) counts as SKIP.
run_step() {
    local name="$1"
    shift
    local out="$SCRATCH/step.out" start end rc
    {
        echo
        echo "===== $name ====="
        echo "\$ $*"
    } >>"$REPORT"
    start=$(date +%s)
    set +e
    "$@" >"$out" 2>&1
    rc=$?
    set -e
    end=$(date +%s)
    cat "$out" >>"$REPORT"
    echo "----- $name: exit $rc after $((end - start)) s" >>"$REPORT"
    if [[ $rc -eq 0 ]]; then
        SUMMARY+=("PASS  $name ($((end - start)) s)")
    elif [[ $rc -eq 5 && "$name" == pytest* ]]; then
        SUMMARY+=("SKIP  $name (no tests selected)")
    else
        SUMMARY+=("FAIL  $name (exit $rc, $((end - start)) s)")
        FAILED=1
    fi
    # Echo the step's last lines so a reader of the console sees what happened.
    echo "--- $name: exit $rc"
    tail -n 15 "$out" || true
}

skip_step() {
    {
        echo
        echo "===== $1 ====="
        echo "skipped: $2"
    } >>"$REPORT"
    SUMMARY+=("SKIP  $1 ($2)")
}

ENV_PY='
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "tensorrt", "tensorrt_rtx_bindings", "onnxruntime", "onnx", "diffusers", "numpy", "pytest"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:22s}", getattr(mod, "__version__", "(no __version__: stub or namespace package)"))
    except Exception as err:
        print(f"{name:22s} missing ({type(err).__name__}: {err})")
try:
    import torch
    print("cuda        ", torch.version.cuda, "available:", torch.cuda.is_available())
    if torch.cuda.is_available():
        print("gpu         ", torch.cuda.get_device_name(), "cc", "%d.%d" % torch.cuda.get_device_capability())
except Exception as err:
    print("torch.cuda   unavailable:", err)
try:
    from fora_export.builder.tensorrt import tensorrt_available
    print("tensorrt_available:", tensorrt_available())
except Exception as err:
    print("tensorrt_available: cannot tell:", type(err).__name__, err)
'
run_step "environment" "$PY" -c "$ENV_PY"
if command -v nvidia-smi >/dev/null 2>&1; then
    run_step "nvidia-smi" nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
else
    skip_step "nvidia-smi" "nvidia-smi not found"
fi

if "$PY" -m pytest --version >/dev/null 2>&1; then
    # shellcheck disable=SC2086  # PYTEST_ARGS is a list of words on purpose
    run_step "pytest gpu/tensorrt" "$PY" -m pytest -m "gpu or tensorrt" -rs ${PYTEST_ARGS:-} tests
else
    SUMMARY+=("FAIL  pytest gpu/tensorrt (pytest is not installed for $PY)")
    echo "pytest is not installed for $PY" >>"$REPORT"
    FAILED=1
fi

# The CLI: the installed console script, or the click entry point run in place.
FORA=()
if command -v fora-export >/dev/null 2>&1 && fora-export --help >/dev/null 2>&1; then
    FORA=(fora-export)
elif "$PY" -c 'import sys; from fora_export.cli import main; sys.exit(main())' --help >/dev/null 2>&1; then
    FORA=("$PY" -c 'import sys; from fora_export.cli import main; sys.exit(main())')
fi
if [[ ${#FORA[@]} -gt 0 ]] && "${FORA[@]}" bench --help >/dev/null 2>&1; then
    BENCH_DIR="$SCRATCH/bench-engine"
    # shellcheck disable=SC2086  # the *_ARGS variables are lists of words on purpose
    run_step "fora-export build (for bench)" "${FORA[@]}" build ${FORA_BUILD_ARGS:-demo-dit} --out "$BENCH_DIR" --force
    if [[ -f "$BENCH_DIR/manifest.json" ]]; then
        # shellcheck disable=SC2086
        run_step "fora-export bench onnxruntime" "${FORA[@]}" bench "$BENCH_DIR" --backend onnxruntime ${FORA_BENCH_ARGS:---steps 20}
        HAS_TRT='import json, sys; sys.exit("tensorrt" not in json.load(open(sys.argv[1])).get("backends", {}))'
        if "$PY" -c "$HAS_TRT" "$BENCH_DIR/manifest.json"; then
            # shellcheck disable=SC2086
            run_step "fora-export bench tensorrt" "${FORA[@]}" bench "$BENCH_DIR" --backend tensorrt ${FORA_BENCH_ARGS:---steps 20}
        else
            skip_step "fora-export bench tensorrt" "the built folder has no TensorRT engines"
        fi
    else
        skip_step "fora-export bench" "the build for the benchmark failed"
    fi
else
    skip_step "fora-export bench" "no bench command in this checkout"
fi

{
    echo
    echo "===== summary ====="
    printf '%s\n' "${SUMMARY[@]}"
} >>"$REPORT"
echo
echo "== GPU check summary (full report: $REPORT) =="
printf '%s\n' "${SUMMARY[@]}"
exit "$FAILED"
