"""The CLI's shared option groups: list options parsed once (one-line errors before any
work), choices taken from the library's constants, and a group ``--help`` without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from fora_export.choices import BUILD_BACKENDS, EXPORTERS, PRECISIONS, QUALITY_SCHEDULE_MODES
from fora_export.cli import main
from fora_export.cli.options import parse_int_list, parse_names
from fora_export.errors import ConfigError
from fora_export.schedulers import SCHEDULER_NAMES


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["-q", *args], catch_exceptions=False, prog_name="fora-export")
    return result.exit_code, result.stderr


def test_int_lists_parse_once_with_one_message() -> None:
    assert parse_int_list("1, 3,,5", "--intervals", "1,2,3") == (1, 3, 5)
    for text in ("1,x", "", " , "):
        with pytest.raises(ConfigError, match=r"^--intervals \| got .* \| expected integers like 1,2,3$"):
            parse_int_list(text, "--intervals", "1,2,3")
    assert parse_names(" onnxruntime, torch ,") == ("onnxruntime", "torch")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bench", "ENGINE", "--intervals", "1,x"], "error: --intervals | got '1,x' | expected"),
        (["validate", "ENGINE", "--batch-sizes", "2,b"], "error: --batch-sizes | got '2,b' | expected"),
        (["quality", "ENGINE", "--schedule-list", "0,y"], "error: --schedule-list | got '0,y' | expected"),
        (
            ["sample", "ENGINE", "--pipeline", "p", "--out", "o", "--class-label", "1", "--class-label", "z"],
            "error: --class-label | got '1,z' | expected integers like 207,360",
        ),
    ],
)
def test_a_bad_list_is_one_line_before_the_folder_is_read(args: list[str], message: str) -> None:
    code, stderr = invoke(*args)  # ENGINE does not exist: the list is refused first
    assert code == 2
    assert stderr.startswith(message) and len(stderr.strip().splitlines()) == 1, stderr


def _choices(command: str, option: str) -> tuple[str, ...]:
    assert isinstance(main, click.Group)
    (param,) = (p for p in main.commands[command].params if p.name == option)
    assert isinstance(param.type, click.Choice)
    return tuple(param.type.choices)


def test_choices_are_the_library_constants() -> None:
    assert _choices("build", "precision") == PRECISIONS
    assert _choices("build", "backend") == BUILD_BACKENDS
    assert _choices("build", "exporter") == EXPORTERS
    assert _choices("quality", "schedule_mode") == QUALITY_SCHEDULE_MODES
    assert _choices("validate", "scheduler") == SCHEDULER_NAMES == ("ddim", "dpm", "flow-euler")
    from fora_export.serving.triton_repo import BACKENDS

    assert _choices("triton", "backend") == ("auto", *BACKENDS)


def test_every_help_loads_no_torch_and_the_group_help_no_numpy(tmp_path: Path) -> None:
    code = """
import sys
from click.testing import CliRunner
from fora_export.cli import main
assert CliRunner().invoke(main, ["--help"]).exit_code == 0
print("group", sorted(m for m in ("numpy", "torch") if m in sys.modules))
for command in main.commands:
    assert CliRunner().invoke(main, [command, "--help"]).exit_code == 0, command
print("commands", sorted(m for m in ("torch", "diffusers", "onnx") if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "group []" in result.stdout and "commands []" in result.stdout, result.stdout
