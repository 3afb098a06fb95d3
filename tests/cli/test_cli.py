"""The CLI end to end through click's CliRunner: output, JSON reports, exit codes,
and user errors as one line without a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fora_runtime.manifest import SCHEMA_VERSION
from tests.helpers import assert_user_error, run_cli


def test_help_lists_the_commands() -> None:
    code, out, _ = run_cli("--help")
    assert code == 0
    for command in ("build", "validate", "bench"):
        assert command in out


def test_build_validate_bench(tiny_dit_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "engine"
    code, stdout, _ = run_cli("build", str(tiny_dit_dir), "--out", str(out), "--batch", "1:2:3")
    assert code == 0, stdout
    assert "4 cache tensors" in stdout and "full.onnx" in stdout

    code, stdout, _ = run_cli("validate", str(out), "--steps", "8", "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["passed"] is True
    assert report["trajectory"]["runtime_vs_fora_rel_l2"] <= 1e-4
    assert {g["role"] for g in report["graphs"]} == {"full", "reuse", "reuse_gated"}

    code, stdout, _ = run_cli(
        "bench", str(out), "--steps", "6", "--intervals", "1,3", "--repeats", "1", "--json"
    )
    assert code == 0
    (bench,) = json.loads(stdout)["runs"]
    assert [r["interval"] for r in bench["intervals"]] == [1, 3]
    assert bench["intervals"][1]["num_full"] == 2 and bench["intervals"][1]["ideal"] == 3.0
    assert bench["full_ms"] > 0 and bench["reuse_ms"] > 0
    # The eager diffusers baseline ran on the same machine, same steps and batch.
    assert bench["eager"]["device"] == "cpu" and bench["eager"]["median_ms"] > 0
    assert bench["intervals"][0]["speedup_vs_eager"] > 0

    code, stdout, _ = run_cli("validate", str(out), "--steps", "4", "--batch-sizes", "2")
    assert code == 0 and "Result: pass" in stdout


def test_validate_exit_code_1_on_mismatch(tiny_engine: Path, tmp_path: Path) -> None:
    from tests.tiny_models import TINY_DIT, save_dit

    impostor = save_dit(tmp_path / "impostor", TINY_DIT, seed=99)
    code, stdout, _ = run_cli(
        "validate", str(tiny_engine), "--model", str(impostor), "--steps", "3", "--batch-sizes", "1"
    )
    assert code == 1
    assert "FAIL" in stdout and "needs" in stdout


def test_missing_model_path(tmp_path: Path) -> None:
    code, _, err = run_cli("build", str(tmp_path / "nope"), "--out", str(tmp_path / "e"))
    assert_user_error(code, err, "no such folder")


def test_unsupported_model_class(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    code, _, err = run_cli("build", str(tmp_path), "--out", str(tmp_path / "e"))
    assert_user_error(code, err, "supported: DiTTransformer2DModel")


@pytest.mark.parametrize(
    ("option", "value", "pattern"),
    [
        ("--interval", "0", "expected an integer >= 1"),
        ("--batch", "4:2:1", "need 1 <= MIN <= OPT <= MAX"),
        ("--resolution", "7", "multiple of patch_size 2"),
    ],
)
def test_bad_build_options(tiny_dit_dir: Path, tmp_path: Path, option: str, value: str, pattern: str) -> None:
    code, _, err = run_cli("build", str(tiny_dit_dir), "--out", str(tmp_path / "e"), option, value)
    assert_user_error(code, err, pattern)
    assert not (tmp_path / "e").exists()


def test_existing_output_needs_force(tiny_dit_dir: Path, tiny_engine: Path) -> None:
    code, _, err = run_cli("build", str(tiny_dit_dir), "--out", str(tiny_engine))
    assert_user_error(code, err, "pass --force")


def test_validate_missing_engine_folder(tmp_path: Path) -> None:
    code, _, err = run_cli("validate", str(tmp_path / "missing"))
    assert_user_error(code, err, "does not exist")


def test_bench_tampered_graph(engine_copy: Path) -> None:
    with open(engine_copy / "reuse.onnx", "ab") as fh:
        fh.write(b"junk")
    code, _, err = run_cli("bench", str(engine_copy))
    assert_user_error(code, err, "truncated or was replaced")


def test_bench_bad_interval(tiny_engine: Path) -> None:
    code, _, err = run_cli("bench", str(tiny_engine), "--intervals", "1,0")
    assert_user_error(code, err, "expected an integer >= 1")


def test_bench_batch_outside_range(tiny_engine: Path) -> None:
    code, _, err = run_cli("bench", str(tiny_engine), "--batch", "9")
    assert_user_error(code, err, r"--batch \| got 9, the engines were built for 1..4")


@pytest.mark.parametrize(("option", "value"), [("--repeats", "0"), ("--steps", "0")])
def test_bench_options_are_checked_before_anything_runs(tiny_engine: Path, option: str, value: str) -> None:
    code, _, err = run_cli("bench", str(tiny_engine), option, value)
    assert_user_error(code, err, f"{option} \\| got 0 \\| expected an integer from 1 to ")


def test_force_only_replaces_engine_folders(tiny_dit_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    code, _, err = run_cli("build", str(tiny_dit_dir), "--out", str(folder), "--force")
    assert_user_error(code, err, "not an engine folder")
    assert (folder / "notes.txt").read_text() == "keep me"


def test_out_must_not_be_the_current_folder(tiny_dit_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("build", str(tiny_dit_dir), "--out", ".", "--force")
    assert_user_error(code, err, "is the current folder or one above it")


def test_torch_backend_build_validate_bench_on_cpu(tiny_dit_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "torch-engine"
    code, stdout, _ = run_cli(
        "build", str(tiny_dit_dir), "--out", str(out), "--backend", "torch", "--device", "cpu"
    )
    assert code == 0 and "full.pt2" in stdout and "reuse.pt2" in stdout
    code, stdout, _ = run_cli("validate", str(out), "--backend", "torch", "--trust", "--steps", "6", "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["backend"] == "torch" and report["passed"]
    code, stdout, _ = run_cli(
        "bench", str(out), "--backend", "torch", "--trust", "--steps", "4", "--repeats", "1", "--json"
    )
    assert code == 0 and json.loads(stdout)["runs"][0]["backend"] == "torch"


def test_torch_backend_needs_programs(tiny_engine: Path) -> None:
    code, _, err = run_cli("bench", str(tiny_engine), "--backend", "torch")
    assert_user_error(code, err, "torch")


def test_bench_several_backends_and_plot(tiny_dit_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "engine"
    code, _, _ = run_cli(
        "build", str(tiny_dit_dir), "--out", str(out), "--backend", "torch", "--device", "cpu"
    )
    assert code == 0
    png = tmp_path / "bench.png"
    code, stdout, _ = run_cli(
        "bench",
        str(out),
        "--backend",
        "onnxruntime,torch",
        "--trust",
        "--steps",
        "4",
        "--intervals",
        "1,2",
        "--repeats",
        "1",
        "--no-eager",
        "--plot",
        str(png),
        "--save-json",
        str(tmp_path / "bench.json"),
    )
    assert code == 0 and "End to end" in stdout  # tables printed, JSON saved
    runs = json.loads((tmp_path / "bench.json").read_text())["runs"]
    assert [r["backend"] for r in runs] == ["onnxruntime", "torch"]
    assert all(r["eager"] is None for r in runs)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_info_describes_the_engine_folder(tiny_engine: Path) -> None:
    code, stdout, _ = run_cli("info", str(tiny_engine))
    assert code == 0
    assert "DiTTransformer2DModel (dit)" in stdout and "batch 1:2:4" in stdout
    assert "4 tensors (attn1, ff)" in stdout and "full.onnx" in stdout
    # 2 blocks x 2 gates + final shift and scale, 16 floats each: 6 x 16 x 4 bytes.
    assert "gate table: yes (0.4 KiB per step and sample, up to 1024 rows" in stdout
    code, stdout, _ = run_cli("info", str(tiny_engine), "--json")
    data = json.loads(stdout)
    assert data["schema_version"] == SCHEMA_VERSION and data["gate_rows"] == {
        "min": 1,
        "opt": 256,
        "max": 1024,
    }


def test_info_refuses_a_tampered_folder(engine_copy: Path) -> None:
    (engine_copy / "full.onnx").write_bytes(b"tampered")
    code, _, err = run_cli("info", str(engine_copy))
    assert_user_error(code, err, "truncated or was replaced")
