from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from fora_export.errors import ConfigError
from fora_export.loading import load_model
from tests.tiny_models import TINY_DIT, save_dit


def test_loads_a_transformer_folder(tiny_dit_dir: Path) -> None:
    loaded = load_model(str(tiny_dit_dir))
    assert loaded.class_name == "DiTTransformer2DModel"
    assert loaded.source == str(tiny_dit_dir.resolve())
    assert loaded.subfolder is None


def test_loads_the_transformer_of_a_pipeline_folder(tiny_dit_dir: Path, tmp_path: Path) -> None:
    import shutil

    pipe = tmp_path / "pipe"
    shutil.copytree(tiny_dit_dir, pipe / "transformer")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    loaded = load_model(str(pipe))
    assert loaded.subfolder == "transformer"
    assert loaded.model.config.num_layers == 2


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such folder"):
        load_model(str(tmp_path / "missing-model"))


def test_mistyped_relative_path_is_not_tried_as_a_hub_id(monkeypatch, tmp_path: Path) -> None:
    """'models/dit-typo' with a models/ folder here is reported at once (no Hub look-up)."""
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    import fora_export.loading as loading

    monkeypatch.setattr(loading, "_load_hub", lambda *a: pytest.fail("tried the Hub"))
    with pytest.raises(
        ConfigError, match=re.escape("no such folder (the folder 'models' exists, 'dit-typo'")
    ):
        load_model("models/dit-typo")


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("no config.json")):
        load_model(str(tmp_path))


def test_unsupported_class_names_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(
        ConfigError,
        match=re.escape("'UNet2DConditionModel' is not supported | supported: DiTTransformer2DModel"),
    ):
        load_model(str(tmp_path))


def test_unknown_hub_id_offline(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="the Hub id could not be resolved"):
        load_model("some-org/some-dit")


def _fake_hub_cache(cache: Path, repo_id: str, model_dir: Path, subfolder: str | None) -> None:
    """Lay out ``model_dir`` as huggingface_hub's cache holds a downloaded repo."""
    import shutil

    revision = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    shutil.copytree(model_dir, snapshot / subfolder if subfolder else snapshot)
    if subfolder:
        (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))


@pytest.mark.parametrize("subfolder", [None, "transformer"], ids=["transformer-repo", "pipeline-repo"])
def test_hub_id_resolves_from_the_local_cache_offline(tiny_dit_dir: Path, tmp_path: Path, subfolder) -> None:
    import os
    import subprocess
    import sys

    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "test-org/tiny-dit", tiny_dit_dir, subfolder)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    out = tmp_path / "engine"
    result = subprocess.run(
        [sys.executable, "-m", "fora_export.cli", "-q", "build", "test-org/tiny-dit", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "test-org/tiny-dit"
    assert manifest["export"]["subfolder"] == subfolder


def test_saved_models_load_straight_into_the_build_precision(tmp_path: Path) -> None:
    """Weights load once, in the target dtype (no fp32 copy first), equal to the saved
    fp32 weights cast."""
    folder = save_dit(tmp_path / "dit", TINY_DIT)
    fp32 = load_model(str(folder)).model
    half = load_model(str(folder), torch.float16).model
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    for (name, want), (_, got) in zip(fp32.state_dict().items(), half.state_dict().items(), strict=True):
        assert torch.equal(got, want.to(torch.float16)), name


def test_the_family_registry_agrees_with_its_adapters_and_demos() -> None:
    from fora_export.adapters import registry

    names = [spec.name for spec in registry.FAMILIES]
    assert len(set(names)) == len(names)
    for spec in registry.FAMILIES:
        adapter = spec.adapter_class
        assert (adapter.family, adapter.model_class) == (spec.name, spec.model_class)
        assert registry.adapter_class_for(spec.model_class) is adapter
        assert registry.family_spec(spec.name) is spec
        for pipeline in spec.pipeline_classes:
            assert registry.family_for_pipeline(pipeline) is spec
    assert registry.supported_classes() == tuple(spec.model_class for spec in registry.FAMILIES)
    for demo in registry.DEMOS:
        registry.family_spec(demo.family)  # a known family
        assert (demo.model is None) != (demo.weights is None), demo.name  # made or trained
        assert set(demo.build_defaults) <= {"resolution", "text_length", "frames"}
        if demo.weights is not None:
            assert demo.trained_by and (demo.weights_folder / "config.json").is_file()
        if demo.pipeline is not None:
            assert callable(registry._resolve(demo.pipeline))
    assert set(registry.demo_pipeline_names()) <= set(registry.demo_names())
    assert "DiT (DiTTransformer2DModel)" in registry.supported_families_text()
    assert "SD3: 333" in registry.text_length_defaults_text()
    assert "dynamo for Flux.1, Wan" in registry.exporter_defaults_text()


@pytest.mark.parametrize("name", ["demo-dit", "demo-sd3", "demo-digits", "demo-digits-flow"])
def test_demo_models_are_of_their_familys_class(name: str) -> None:
    from fora_export.adapters.registry import demo_spec, family_spec

    demo = demo_spec(name)
    loaded = load_model(name, torch.float32)
    assert loaded.class_name == family_spec(demo.family).model_class
    assert loaded.source == name and loaded.build_defaults == dict(demo.build_defaults)


def test_missing_trained_demo_weights_name_the_command_that_trains_them(monkeypatch, tmp_path: Path) -> None:
    import fora_export.demo

    monkeypatch.setattr(fora_export.demo, "DEMO_DIGITS_DIR", tmp_path / "nothing")
    with pytest.raises(
        ConfigError, match=r"demo-digits \| no trained weights in .* tools/train_digits.py --family dit"
    ):
        load_model("demo-digits")


def test_a_demo_pipeline_is_made_from_the_registry() -> None:
    from fora_export.adapters.registry import family_for_pipeline
    from fora_export.validate.three_ways import load_pipeline

    pipe = load_pipeline("demo-dit")
    assert family_for_pipeline(type(pipe).__name__).name == "dit"
    assert type(pipe.transformer).__name__ == "DiTTransformer2DModel"
    with pytest.raises(ConfigError, match=r"not a built-in pipeline \(demo-dit, demo-pixart, demo-flux"):
        load_pipeline("demo-dit-xl")  # a demo model without a demo pipeline
