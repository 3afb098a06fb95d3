# Sourced by the GPU scripts (gpu_bench.sh, gpu_check.sh): makes fora-export and fora-runtime
# importable from a bare checkout. Needs ROOT (the repository) and PY (the interpreter).
# Packages missing on a bare GPU machine (diffusers there) travel as wheels in ./.whl
# (tools/fetch_gpu_wheels.sh): they are installed into a private target, not the system.
if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/fora-site "$ROOT"/.whl/*.whl
    export PYTHONPATH="/tmp/fora-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT:$ROOT/runtime${PYTHONPATH:+:$PYTHONPATH}"
