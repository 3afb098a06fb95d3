"""Every way the CLI can be given bad input ends in one line, ``error: subject | problem |
fix``, with exit 2; SIGINT exits 130 and SIGTERM 143, leaving nothing half-written; data
is never read as rich markup; ``info`` needs no torch."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fora_runtime.manifest import MANIFEST_NAME
from tests.helpers import run_cli
from tests.runtime.test_import_boundary import blocker


def assert_one_line(code: int, stderr: str, pattern: str, exit_code: int = 2) -> None:
    assert code == exit_code, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert lines[0].count(" | ") >= 2, stderr  # subject | problem | fix
    assert re.search(pattern, lines[0]), stderr


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["info", "ENGINE", "--bogus"], r"^error: --bogus \| no such option of `fora-export info`"),
        (["bench", "ENGINE", "--steps", "x"], r"^error: --steps \| 'x' is not a valid integer"),
        (["info"], r"^error: ENGINE_DIR \| missing \| see `fora-export info --help`"),
        (["nosuch"], r"^error: fora-export \| No such command 'nosuch'"),
        (["build", "demo-dit", "--precision", "fp8"], r"^error: --precision \| 'fp8' is not one of"),
        (
            ["bench", "ENGINE", "--verify", "some"],
            r"^error: --verify \| 'some' is not one of 'stamp', 'full'",
        ),
    ],
)
def test_usage_errors_are_one_line(tiny_engine: Path, args: list[str], pattern: str) -> None:
    args = [str(tiny_engine) if a == "ENGINE" else a for a in args]
    code, _, err = run_cli(*args)
    assert_one_line(code, err, pattern)


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (
            ["validate", "ENGINE", "--steps", "1001"],
            r"^error: --steps \| got 1001, the model was trained",
        ),
        (["calibrate", "ENGINE", "--steps", "1001", "--full-steps", "3"], r"^error: --steps \| got 1001"),
        (
            ["bench", "ENGINE", "--steps", "99999999999999999999", "--no-eager"],
            r"^error: --steps \| got 9+ \|",
        ),
        (
            ["validate", "ENGINE", "--seed", "99999999999999999999"],
            r"^error: --seed \| 9+ is not in the range",
        ),
        (["calibrate", "ENGINE", "--steps", "4", "--full-steps", "2", "--seed", "-1"], r"^error: --seed \|"),
    ],
)
def test_out_of_range_counts_and_seeds_are_one_line(tiny_engine: Path, args: list[str], pattern: str) -> None:
    # Once diffusers' scheduler or numpy raised them as tracebacks with exit 1.
    args = [str(tiny_engine) if a == "ENGINE" else a for a in args]
    code, _, err = run_cli(*args)
    assert_one_line(code, err, pattern)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"[1, 2]", r"config\.json \| is a JSON list, expected an object"),
        (b"\xff\xfe{}", r"config\.json \| cannot read it as UTF-8 JSON"),
        (
            b"[" * 100_000 + b"]" * 100_000,
            r"config\.json \| cannot read it as UTF-8 JSON \(nested too deep\)",
        ),
        (json.dumps({"_class_name": ["DiT"]}).encode(), r"config\.json \| has no _class_name"),
    ],
)
def test_malformed_model_configs(tmp_path: Path, content: bytes, pattern: str) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_bytes(content)
    code, _, err = run_cli("build", str(tmp_path / "model"), "--out", str(tmp_path / "e"))
    assert_one_line(code, err, pattern)


def test_a_batch_beyond_any_integer_type(tiny_dit_dir: Path, tmp_path: Path, tiny_engine: Path) -> None:
    code, _, err = run_cli(
        "build", str(tiny_dit_dir), "--out", str(tmp_path / "e"), "--batch", f"1:2:{2**64}"
    )
    assert_one_line(code, err, r"--batch \| got '1:2:18446744073709551616' \| MAX must be at most")
    code, _, err = run_cli("bench", str(tiny_engine), "--batch", str(2**64))
    assert_one_line(code, err, r"--batch \| got 18446744073709551616, the engines were built for 1..4")


@pytest.mark.parametrize(
    ("option", "name", "pattern"),
    [
        ("--save-json", "missing/bench.json", r"--save-json '.*' \| folder .*missing does not exist"),
        ("--plot", "bench.gif", r"--plot '.*' \| unknown image type '.gif'"),
        ("--save-json", ".", r"--save-json '.*' \| is a folder"),
    ],
)
def test_bench_outputs_are_checked_before_any_work(
    tiny_engine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, option: str, name: str, pattern: str
) -> None:
    import fora_export.bench

    def no_work(*args, **kwargs):
        raise AssertionError("the benchmark ran before its output path was checked")

    monkeypatch.setattr(fora_export.bench, "bench", no_work)
    monkeypatch.setattr(fora_export.bench, "eager_baseline", no_work)
    code, _, err = run_cli("bench", str(tiny_engine), option, str(tmp_path / name))
    assert_one_line(code, err, pattern)


def test_validate_report_folder_is_checked_before_any_work(tiny_engine: Path, tmp_path: Path) -> None:
    (tmp_path / "report").write_text("a file, not a folder")
    code, _, err = run_cli("validate", str(tiny_engine), "--report", str(tmp_path / "report"))
    assert_one_line(code, err, r"--report '.*report' \| is a file \| pass a folder")


def test_a_full_disk_is_one_line_naming_the_file_and_the_bytes(
    tiny_engine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fora_export import outputs

    def full_disk(self: Path, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(outputs.Path, "write_bytes", full_disk)
    target = tmp_path / "report.json"
    with pytest.raises(
        outputs.ConfigError, match=r"report\.json \| no space left .*: it needed 12 bytes"
    ) as e:
        outputs.write_text_atomic(target, "twelve bytes", "--save-json")
    assert "No space left on device" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_any_out_of_space_error_is_one_line(tiny_engine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fora_export.reports

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/somewhere/file.bin")

    monkeypatch.setattr(fora_export.reports, "print_manifest", full_disk)
    code, _, err = run_cli("info", str(tiny_engine))
    assert_one_line(code, err, r"^error: /somewhere/file\.bin \| no space left on the device")


def test_markup_in_paths_and_manifests_is_printed_verbatim(tiny_engine: Path, tmp_path: Path) -> None:
    folder = tmp_path / "eng[/b]"
    shutil.copytree(tiny_engine, folder)
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["source"] = "[bold red]models[/]/dit:smile:"
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    code, out, err = run_cli("info", str(folder))
    assert code == 0, err
    assert "eng[/b]" in out and "[bold red]models[/]/dit:smile:" in out


def test_info_does_not_import_torch(tiny_engine: Path) -> None:
    code = (
        blocker(("torch", "diffusers", "onnx", "onnxruntime"))
        + f"""
from fora_export.cli import main
try:
    main(["info", {str(tiny_engine)!r}])
except SystemExit as exit:
    print("exit", exit.code)
"""
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "exit 0" in result.stdout, result.stderr
    assert "DiTTransformer2DModel" in result.stdout


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_exit_130_and_143_leaving_nothing_behind(
    tiny_dit_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: int, exit_code: int
) -> None:
    from fora_export.builder import pipeline

    def interrupted_export(loaded, folder: Path, config, stages, *, tensorrt_flavor=None):
        (folder / "full.onnx").write_bytes(b"half a graph")
        os.kill(os.getpid(), signum)
        raise AssertionError("the signal did not interrupt the build")

    monkeypatch.setattr(pipeline, "export_folder", interrupted_export)
    previous = signal.getsignal(signal.SIGTERM)
    code, _, err = run_cli("build", str(tiny_dit_dir), "--out", str(tmp_path / "engine"))
    name = "interrupted" if signum == signal.SIGINT else "terminated"
    assert_one_line(code, err, f"^error: fora-export \\| {name} .* nothing was left half-written", exit_code)
    assert list(tmp_path.iterdir()) == []  # neither the engine folder nor the hidden build folder
    assert signal.getsignal(signal.SIGTERM) == previous  # the CLI restored the handler


def test_bench_json_is_written_whole(tiny_engine: Path, tmp_path: Path) -> None:
    target = tmp_path / "bench.json"
    code, _, err = run_cli(
        "bench", str(tiny_engine), "--steps", "2", "--intervals", "1", "--repeats", "1", "--no-eager",
        "--save-json", str(target),
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(target.read_text())["runs"][0]["backend"] == "onnxruntime"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]  # no temporary left
