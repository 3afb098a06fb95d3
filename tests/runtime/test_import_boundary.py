"""fora_runtime is embedded in services: it must import without the exporter,
diffusers or onnx (each runtime module is imported in a fresh interpreter with
those packages blocked). The one exception is ``fora_runtime.diffusers.facade`` (the
``fora-runtime[diffusers]`` extra, imported by ``fora_runtime.diffusers`` on first use of
its names): it may import diffusers (and what diffusers imports), never the exporter or
onnx."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import fora_runtime

BLOCKED = ("fora_export", "diffusers", "onnx", "onnxscript", "transformers")
#: The drop-in for diffusers pipelines, the one module allowed diffusers and torch.
DIFFUSERS_MODULE = "fora_runtime.diffusers.facade"

#: Runtime modules that run inside a host process providing a module of its own: the Triton
#: model imports Triton's stub's ``triton_python_backend_utils`` (an empty stand-in here).
HOST_MODULES = {"fora_runtime.serving.triton_model": "triton_python_backend_utils"}

RUNTIME_MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(fora_runtime.__path__, prefix="fora_runtime.")
    if m.name != DIFFUSERS_MODULE
)


def blocker(blocked: tuple[str, ...]) -> str:
    return f"""
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Blocker())
"""


BLOCKER = blocker(BLOCKED)


@pytest.mark.parametrize("module", ["fora_runtime", *RUNTIME_MODULES])
def test_runtime_module_imports_without_exporter_diffusers_or_onnx(module: str) -> None:
    host = HOST_MODULES.get(module)
    stand_in = f"import types\nsys.modules[{host!r}] = types.ModuleType({host!r})\n" if host else ""
    code = (
        BLOCKER
        + stand_in
        + f"import {module}\nprint('loaded', [m for m in sys.modules if m.split('.')[0] in {BLOCKED!r}])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "loaded []" in result.stdout


def test_diffusers_module_imports_without_exporter_or_onnx() -> None:
    blocked = ("fora_export", "onnx", "onnxscript")
    code = (
        blocker(blocked)
        + "from fora_runtime.diffusers import ForaTransformer\nprint('ok', 'diffusers' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ok True" in result.stdout


def test_blocker_really_blocks() -> None:
    code = BLOCKER + "import diffusers"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "blocked for this test" in result.stderr


def test_onnxruntime_session_runs_with_exporter_blocked(tiny_engine) -> None:
    code = (
        BLOCKER
        + f"""
import numpy as np
from fora_runtime import ForaSession
with ForaSession({str(tiny_engine)!r}) as session:
    gen = session.start(3, 2)
    for t in (999, 500, 0):
        out = gen.step(np.zeros((2, 4, 8, 8), np.float32), t, class_labels=np.array([1, 2]))
print('ok', out.shape)
"""
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ok (2, 8, 8, 8)" in result.stdout
