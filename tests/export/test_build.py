from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from fora_export.builder import pipeline
from fora_export.builder.config import BuildConfig, parse_batch, parse_resolution
from fora_export.errors import BuildError, ConfigError, ExportError
from fora_runtime import ForaSession, load_manifest


def test_refuses_to_overwrite_without_force(tiny_dit_dir: Path, tiny_engine: Path) -> None:
    with pytest.raises(BuildError, match=re.escape("already exists | pass --force")):
        pipeline.build(str(tiny_dit_dir), tiny_engine, BuildConfig(), progress=False)


def test_failed_build_leaves_nothing_behind(tiny_dit_dir: Path, tmp_path: Path, monkeypatch) -> None:
    calls = []

    def failing_export(*args, **kwargs):
        calls.append(args[4])
        if len(calls) == 2:  # the full graph was written, the reuse export fails
            raise ExportError("reuse.onnx | simulated failure")
        return real_export(*args, **kwargs)

    real_export = pipeline.export_onnx
    monkeypatch.setattr(pipeline, "export_onnx", failing_export)
    out = tmp_path / "engine"
    with pytest.raises(ExportError, match="simulated failure"):
        pipeline.build(str(tiny_dit_dir), out, BuildConfig(), progress=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder either


def test_failed_rebuild_keeps_the_previous_folder(engine_copy: Path, tiny_dit_dir: Path, monkeypatch) -> None:
    before = load_manifest(engine_copy)

    def failing_export(*args, **kwargs):
        raise ExportError("simulated failure")

    monkeypatch.setattr(pipeline, "export_onnx", failing_export)
    with pytest.raises(ExportError):
        pipeline.build(str(tiny_dit_dir), engine_copy, BuildConfig(), force=True, progress=False)
    assert load_manifest(engine_copy) == before


def test_force_replaces_and_records_the_new_config(engine_copy: Path, tiny_dit_dir: Path) -> None:
    config = BuildConfig.from_options(batch="2:2:3", interval=5, schedule_mode="reference")
    pipeline.build(str(tiny_dit_dir), engine_copy, config, force=True, progress=False)
    manifest = load_manifest(engine_copy)
    assert str(manifest.batch) == "2:2:3"
    assert manifest.schedule.to_dict() == {"kind": "interval", "interval": 5, "mode": "reference"}
    assert [p.name for p in engine_copy.parent.iterdir()] == [engine_copy.name]


def test_external_data_graphs_load_and_run(tiny_dit_dir: Path, tmp_path: Path) -> None:
    config = BuildConfig.from_options(batch="1:1:2")
    config = BuildConfig(
        batch=config.batch, schedule=config.schedule, export=type(config.export)(external_data=True)
    )
    out = tmp_path / "ext"
    pipeline.build(str(tiny_dit_dir), out, config, progress=False)
    manifest = load_manifest(out)
    assert {"full.onnx.data", "reuse.onnx.data"} <= set(manifest.files)
    assert (out / "full.onnx").stat().st_size < 100_000  # weights live in the data file
    graph_mode = (out / "full.onnx").stat().st_mode & 0o777
    assert (out / "full.onnx.data").stat().st_mode & 0o777 == graph_mode
    with ForaSession(out) as session:
        gen = session.start(2, 1)
        out0 = gen.step(np.zeros((1, 4, 8, 8), np.float32), 999, class_labels=np.array([3]))
    assert np.isfinite(out0).all()


def test_bf16_graphs_export_and_pass_the_checker(tiny_dit_dir: Path, tmp_path: Path) -> None:
    # ONNX Runtime's CPU provider has no bf16 kernels for these graphs; TensorRT runs them.
    out = tmp_path / "bf16"
    pipeline.build(str(tiny_dit_dir), out, BuildConfig.from_options(precision="bf16"), progress=False)
    manifest = load_manifest(out)
    assert manifest.precision == "bf16"
    assert manifest.graphs["full"].inputs[0].dtype == "bfloat16"
    assert all(c.dtype == "bfloat16" for c in manifest.caches)
    assert manifest.graphs["full"].inputs[1].dtype == "float32"  # timesteps stay fp32
    for name in ("full.onnx", "reuse.onnx"):
        onnx.checker.check_model(str(out / name), full_check=True)


def test_dynamo_exporter_builds_valid_graphs(tiny_dit_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "dynamo"
    pipeline.build(str(tiny_dit_dir), out, BuildConfig.from_options(exporter="dynamo"), progress=False)
    manifest = load_manifest(out)
    assert manifest.export.exporter == "dynamo" and manifest.export.opset == 18
    assert manifest.graphs["full"].outputs[1].shape == ("batch", 16, 16)


def test_resolution_other_than_the_config(tiny_dit_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "res"
    pipeline.build(str(tiny_dit_dir), out, BuildConfig.from_options(resolution="12"), progress=False)
    manifest = load_manifest(out)
    assert manifest.resolution == (12, 12)
    assert manifest.caches[0].shape == ("batch", 36, 16)


def test_bad_resolution(tiny_dit_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="multiple of patch_size 2"):
        pipeline.build(
            str(tiny_dit_dir), tmp_path / "x", BuildConfig.from_options(resolution="9"), progress=False
        )
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("text", "expected"), [("1:2:8", (1, 2, 8)), ("4", (4, 4, 4)), ("1:8", (1, 8, 8))])
def test_parse_batch(text: str, expected: tuple[int, int, int]) -> None:
    batch = parse_batch(text)
    assert (batch.min, batch.opt, batch.max) == expected


@pytest.mark.parametrize("text", ["0:1:2", "4:2:8", "a:b", "1:2:3:4", ""])
def test_parse_batch_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="--batch"):
        parse_batch(text)


def test_parse_resolution() -> None:
    assert parse_resolution("32") == (32, 32)
    assert parse_resolution("16x24") == (16, 24)
    with pytest.raises(ConfigError, match="--resolution"):
        parse_resolution("big")


def test_interval_below_one_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=re.escape("--interval | Cache interval | got 0")):
        BuildConfig.from_options(interval=0)


def test_bad_precision_and_opset() -> None:
    with pytest.raises(ConfigError, match="--precision"):
        BuildConfig.from_options(precision="int8")
    with pytest.raises(ConfigError, match="needs opset >= 17"):
        BuildConfig.from_options(opset=13)
