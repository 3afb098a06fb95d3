"""tools/trt_typings.py: the TensorRT stubs mypy checks against parse, and their types are used."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("trt_typings", ROOT / "tools" / "trt_typings.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fix_def_renames_keyword_parameters_and_fills_missing_defaults() -> None:
    fix = _tool().fix_def
    assert fix("    def f(self, in: list[int], out: int) -> None:") == (
        "    def f(self, in_: list[int], out: int) -> None:"
    )
    fixed = fix("    def g(self, a: int, b: W = None, c: int) -> L:")
    assert fixed == "    def g(self, a: int, b: W = None, c: int = ...) -> L:"
    ast.parse(fixed.strip() + " ...")
    # Keyword-only parameters after a bare * may lack defaults.
    keyword_only = "    def h(self, a: int = 1, *, b: int) -> None:"
    assert fix(keyword_only) == keyword_only
    assert fix("    x: int = 3") == "    x: int = 3"


SITE = Path(sysconfig.get_paths()["purelib"])


@pytest.mark.skipif(not (SITE / "tensorrt" / "__init__.pyi").is_file(), reason="tensorrt-stubs not installed")
def test_repaired_stubs_type_check_tensorrt_code(tmp_path: Path) -> None:
    written = _tool().write_typings(SITE, tmp_path / "typings")
    assert {p.name for p in written} >= {"__init__.pyi", "tensorrt.pyi"}
    code = tmp_path / "uses_trt.py"
    code.write_text(
        "import tensorrt as trt\n\n\ndef f() -> None:\n"
        "    builder = trt.Builder(trt.Logger())\n    builder.no_such_attribute\n"
    )
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\n[mypy-tensorrt.*,tensorrt_bindings.*,tensorrt]\nignore_errors = True\n")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), "--no-incremental", str(code)],
        env={"MYPYPATH": str(tmp_path / "typings"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    # The stubs' Builder is known: a misspelt attribute is an error, not Any.
    assert '"Builder" has no attribute "no_such_attribute"' in result.stdout, result.stdout + result.stderr
