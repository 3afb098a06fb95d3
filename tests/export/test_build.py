from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from fora_export.builder import pipeline
from fora_export.builder.config import BuildConfig, parse_batch, parse_resolution
from fora_export.builder.graphs import check_planned_graphs, plan_build
from fora_export.errors import BuildError, ConfigError, ExportError
from fora_export.export.onnx_export import ExportConfig, export_onnx
from fora_export.loading import load_model
from fora_runtime import ForaSession, load_manifest
from fora_runtime.manifest import BatchRange, GraphSpec, TensorSpec


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


def test_the_planned_graph_set_is_what_the_build_exports(tiny_dit_dir: Path, tiny_engine: Path) -> None:
    # Planning exports nothing; its IO specs (batch axis symbolic) are the graphs' real IO.
    manifest = load_manifest(tiny_engine)
    loaded = load_model(str(tiny_dit_dir), None)
    with plan_build(loaded, BuildConfig.from_options(batch="1:2:4")) as plan:
        assert [job.role for job in plan.jobs] == list(manifest.graphs)
        assert plan.graphs == manifest.graphs
        assert plan.caches == manifest.caches
        assert plan.gate_rows == manifest.gate_rows
        check_planned_graphs(pipeline._manifest(plan, loaded, plan.graphs))


class _IgnoresItsSecondInput(torch.nn.Module):
    def forward(self, x: torch.Tensor, unused: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_export_returns_the_graph_io_as_written(tmp_path: Path) -> None:
    # The exporter drops inputs the graph does not use: the spec it returns is the file's IO.
    path = tmp_path / "g.onnx"
    args = (torch.randn(2, 3), torch.randn(2, 5))
    config = ExportConfig(exporter="torchscript", opset=17)
    spec = export_onnx(
        _IgnoresItsSecondInput(), args, ["x", "unused"], ["y"], path, config, batch_range=BatchRange(1, 2, 4)
    )
    assert spec == GraphSpec(
        file="g.onnx",
        inputs=(TensorSpec("x", "float32", ("batch", 3)),),
        outputs=(TensorSpec("y", "float32", ("batch", 3)),),
    )
    graph = onnx.load(str(path)).graph
    assert [v.name for v in graph.input] == ["x"] and [v.name for v in graph.output] == ["y"]


@pytest.mark.parametrize(
    ("options", "roles"),
    [
        ({}, ["full", "reuse", "gates", "reuse_gated"]),
        ({"reuse_graph": "plain"}, ["full", "reuse"]),
        ({"forecast": True}, ["full", "reuse", "gates", "reuse_gated", "reuse_forecast"]),
        ({"cache": "attn1", "reuse_graph": "plain"}, ["full", "reuse"]),
    ],
)
def test_builds_are_planned_without_exporting(tiny_dit_dir: Path, options: dict, roles: list[str]) -> None:
    loaded = load_model(str(tiny_dit_dir), None)
    with plan_build(loaded, BuildConfig.from_options(batch="1:2:4", **options)) as plan:
        assert [job.role for job in plan.jobs] == roles
        caches = [c.name for c in plan.caches]
        assert plan.jobs[0].output_names == ["prediction", *caches]
        assert all(set(caches) <= set(job.input_names) for job in plan.jobs if job.role.startswith("reuse"))
        check_planned_graphs(pipeline._manifest(plan, loaded, plan.graphs))
