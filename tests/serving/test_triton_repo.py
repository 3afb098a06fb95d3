"""``fora-export triton`` writes a model repository: its layout and config.pbtxt, and the
refusals (non-repository folders, models it did not write, options the build cannot serve),
all as one-line errors with exit code 2; a failed write leaves nothing behind."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fora_runtime import load_manifest
from tests.helpers import CliRun, run_cli


def invoke(*args: str) -> CliRun:
    return run_cli("triton", *args)


def assert_user_error(code: int, stderr: str, pattern: str) -> None:
    assert code == 2, stderr
    assert stderr.startswith("error: ") and "Traceback" not in stderr and stderr.count("\n") == 1
    assert re.search(pattern, stderr), stderr


def test_writes_a_self_contained_model(tiny_engine: Path, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    code, out, _ = invoke(
        str(tiny_engine), "--out", str(repo), "--name", "dit", "--instances", "2", "--threads", "1"
    )
    assert code == 0
    assert "2 cpu instance(s), onnxruntime, DDIMScheduler, up to 4 samples per request" in out
    assert f"python tools/serve_triton.py {repo}" in out
    model = repo / "dit"
    assert sorted(p.name for p in model.iterdir()) == ["1", "config.pbtxt", "fora_model.json"]
    assert sorted(p.name for p in (model / "1").iterdir()) == ["engine", "model.py", "scheduler_config.json"]
    load_manifest(model / "1" / "engine")  # the copy verifies against its manifest
    assert (model / "1" / "model.py").read_text() == (
        Path(__file__).parents[2] / "runtime" / "fora_runtime" / "serving" / "triton_model.py"
    ).read_text()
    scheduler = json.loads((model / "1" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler" and scheduler["clip_sample"] is False
    config = (model / "config.pbtxt").read_text()
    assert 'name: "dit"' in config and 'backend: "python"' in config and "max_batch_size: 4" in config
    assert '{ name: "latents" data_type: TYPE_FP32 dims: [ 4, 8, 8 ] optional: true }' in config
    assert '{ name: "class_labels" data_type: TYPE_INT64 dims: [ 1 ] }' in config
    assert '{ name: "final_latents" data_type: TYPE_FP32 dims: [ 4, 8, 8 ] }' in config
    assert "instance_group [ { count: 2 kind: KIND_CPU } ]" in config
    assert "dynamic_batching { max_queue_delay_microseconds: 2000 }" in config
    assert '{ key: "fora_threads" value: { string_value: "1" } }' in config
    assert '{ key: "fora_python_path" value: { string_value: "[]" } }' in config

    # A second model in the same repository; without dynamic batching, with a python path.
    code, _, _ = invoke(
        str(tiny_engine), "--out", str(repo), "--name", "plain", "--no-dynamic-batching",
        "--max-batch", "2", "--python-path", "/opt/env/site-packages",
    )  # fmt: skip
    assert code == 0
    plain = (repo / "plain" / "config.pbtxt").read_text()
    assert "dynamic_batching" not in plain and "max_batch_size: 2" in plain
    assert r'string_value: "[\"/opt/env/site-packages\"]"' in plain


def test_replacing_needs_force_and_a_model_it_wrote(tiny_engine: Path, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    assert invoke(str(tiny_engine), "--out", str(repo))[0] == 0
    code, _, err = invoke(str(tiny_engine), "--out", str(repo))
    assert_user_error(code, err, r"models/fora \| exists \| pass --force")
    assert invoke(str(tiny_engine), "--out", str(repo), "--force", "--instances", "3")[0] == 0
    assert "count: 3" in (repo / "fora" / "config.pbtxt").read_text()

    foreign = repo / "other"
    foreign.mkdir()
    (foreign / "config.pbtxt").write_text('name: "other"\n')
    code, _, err = invoke(str(tiny_engine), "--out", str(repo), "--name", "other", "--force")
    assert_user_error(code, err, "is a model this tool did not write")
    assert (foreign / "config.pbtxt").read_text() == 'name: "other"\n'


def test_refuses_a_folder_that_is_not_a_model_repository(tiny_engine: Path, tmp_path: Path) -> None:
    folder = tmp_path / "stuff"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    code, _, err = invoke(str(tiny_engine), "--out", str(folder), "--force")
    assert_user_error(code, err, r"is not a Triton model repository \(holds \['notes.txt'\]\)")
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--max-batch", "9"], r"Max batch \| got 9 \| expected 1..4"),
        (["--backend", "tensorrt", "--kind", "gpu"], "has no full.plan"),
        (["--backend", "torch"], "has no full.pt2"),
        (["--name", ".hidden"], "expected a plain folder name"),
        (["--instances", "0"], "--instances | got 0"),
        (["--pipeline", "PIPELINE"], "has no scheduler/scheduler_config.json"),
    ],
)
def test_bad_options_write_nothing(tiny_engine: Path, tmp_path: Path, args: list[str], pattern: str) -> None:
    repo = tmp_path / "models"
    args = [str(tmp_path) if a == "PIPELINE" else a for a in args]
    code, _, err = invoke(str(tiny_engine), "--out", str(repo), *args)
    assert_user_error(code, err, pattern.replace("--instances |", r"--instances \|"))
    assert not repo.exists() or not any(repo.iterdir())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_pipeline_scheduler_config_is_copied_and_checked(tiny_engine: Path, tmp_path: Path) -> None:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    pipeline = tmp_path / "pipe"
    DDIMScheduler(beta_schedule="scaled_linear", timestep_spacing="trailing").save_config(
        pipeline / "scheduler"
    )
    repo = tmp_path / "models"
    code, out, _ = invoke(str(tiny_engine), "--out", str(repo), "--pipeline", str(pipeline))
    assert code == 0 and "DDIMScheduler" in out
    copied = json.loads((repo / "fora" / "1" / "scheduler_config.json").read_text())
    assert copied["beta_schedule"] == "scaled_linear" and copied["timestep_spacing"] == "trailing"

    DDIMScheduler(thresholding=True).save_config(pipeline / "scheduler")
    code, _, err = invoke(str(tiny_engine), "--out", str(repo), "--name", "t", "--pipeline", str(pipeline))
    assert_user_error(code, err, "thresholding is on")

    DPMSolverMultistepScheduler().save_config(pipeline / "scheduler")
    code, out, _ = invoke(str(tiny_engine), "--out", str(repo), "--name", "dpm", "--pipeline", str(pipeline))
    assert code == 0 and "DPMSolverMultistepScheduler" in out


def test_missing_engine_folder_is_a_one_line_error(tmp_path: Path) -> None:
    code, _, err = invoke(str(tmp_path / "nope"), "--out", str(tmp_path / "models"))
    assert_user_error(code, err, r"does not exist \| run `fora-export build` first")


def test_torch_programs_are_served_only_from_a_trusted_folder(
    tiny_torch_engine: Path, tmp_path: Path
) -> None:
    """auto on GPU instances picks torch programs only with --trust, which config.pbtxt records
    for model.py's session."""
    repo = tmp_path / "models"
    code, out, _ = invoke(str(tiny_torch_engine), "--out", str(repo), "--kind", "gpu")
    assert code == 0 and "onnxruntime" in out
    assert (
        '{ key: "fora_trust_programs" value: { string_value: "false" } }'
        in (repo / "fora" / "config.pbtxt").read_text()
    )
    code, out, _ = invoke(str(tiny_torch_engine), "--out", str(repo), "--kind", "gpu", "--trust", "--force")
    assert code == 0 and "torch" in out
    assert (
        '{ key: "fora_trust_programs" value: { string_value: "true" } }'
        in (repo / "fora" / "config.pbtxt").read_text()
    )


def test_only_the_listed_files_are_copied(engine_copy: Path, tmp_path: Path) -> None:
    """A stray symlink in the engine folder is not followed into the repository."""
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the repository")
    (engine_copy / "notes.txt").symlink_to(secret)
    repo = tmp_path / "models"
    assert invoke(str(engine_copy), "--out", str(repo))[0] == 0
    copied = sorted(p.name for p in (repo / "fora" / "1" / "engine").iterdir())
    assert copied == sorted(["manifest.json", *load_manifest(engine_copy).files])
