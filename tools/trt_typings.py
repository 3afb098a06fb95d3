"""Make the tensorrt-stubs usable by mypy: copy them into ``.typings/`` with their syntax fixed.

``tensorrt-stubs`` installs ``tensorrt/__init__.pyi`` and ``tensorrt_bindings/tensorrt.pyi``
into site-packages without a ``py.typed`` marker, so mypy ignores them and every TensorRT
name is ``Any``: the TensorRT modules would not be type-checked at all. Pointed at directly
(``mypy_path``), the generated stubs fail to parse: parameters named after keywords
(``in``) and parameters without a default after ones with a default. This script copies the
two stub packages into ``.typings/`` (git-ignored; ``mypy_path`` in pyproject.toml) with
those two flaws repaired and the import of ``tensorrt_libs`` (no stub exists) dropped; the
stubs' own remaining type errors are silenced by a mypy override, their types are used.

Usage: ``python tools/trt_typings.py [SITE_PACKAGES] [OUT]`` (defaults: this interpreter's
site-packages, ``.typings``). Exits 0 without writing anything when the stubs are absent.
"""

from __future__ import annotations

import ast
import keyword
import re
import shutil
import sys
import sysconfig
from pathlib import Path

PACKAGES = ("tensorrt", "tensorrt_bindings")
_DEF = re.compile(r"^(\s*def \w+\()(.*)(\)\s*(?:->.*)?:\s*(?:\.\.\.)?\s*)$")


def _split_parameters(text: str) -> list[str]:
    """Top-level comma-separated parts of a parameter list (brackets nest)."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current)
    return parts


def _has_default(parameter: str) -> bool:
    annotation_and_default = parameter.split(":", 1)[-1]
    return re.search(r"(?<![=!<>])=(?!=)", annotation_and_default) is not None


def fix_def(line: str) -> str:
    """One stub ``def`` line with keyword-named parameters renamed (``in`` -> ``in_``) and
    parameters after a defaulted one given ``= ...``."""
    match = _DEF.match(line)
    if not match:
        return line
    head, parameters, tail = match.groups()
    fixed, after_default = [], False
    for raw in _split_parameters(parameters):
        parameter = raw.strip()
        name = re.match(r"^\**(\w+)", parameter)
        if name and keyword.iskeyword(name.group(1)):
            parameter = parameter.replace(name.group(1), name.group(1) + "_", 1)
        if parameter.startswith("*"):
            after_default = after_default and parameter != "*"
        elif _has_default(parameter):
            after_default = True
        elif after_default:
            parameter += " = ..."
        fixed.append(parameter)
    return head + ", ".join(fixed) + tail


def write_typings(site_packages: Path, out: Path) -> list[Path]:
    """Copy and repair the stub packages; returns the stub files written (none when absent)."""
    sources = [site_packages / name for name in PACKAGES]
    if not all((source / "__init__.pyi").is_file() for source in sources):
        return []
    shutil.rmtree(out, ignore_errors=True)
    written = []
    for source in sources:
        shutil.copytree(source, out / source.name, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    for stub in sorted(out.rglob("*.pyi")):
        lines = stub.read_text().split("\n")
        text = "\n".join(fix_def(line) if line.lstrip().startswith("def ") else line for line in lines)
        text = text.replace("import tensorrt_libs as tensorrt_libs\n", "")
        ast.parse(text, filename=str(stub))  # a stub still unparsable is this script's bug: fail loudly
        stub.write_text(text)
        written.append(stub)
    return written


def main(argv: list[str]) -> int:
    site_packages = Path(argv[1]) if len(argv) > 1 else Path(sysconfig.get_paths()["purelib"])
    out = Path(argv[2]) if len(argv) > 2 else Path(".typings")
    written = write_typings(site_packages, out)
    print(f"tensorrt stubs: {len(written)} files in {out}" if written else "tensorrt stubs: not installed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
