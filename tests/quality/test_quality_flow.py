"""``fora-export quality`` on the trained flow-matching digit model (``demo-digits-flow``:
an SD3 MMDiT, rectified flow, class tables as its conditioning inputs)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from fora_export.adapters.registry import demo_spec
from fora_export.demo import DEMO_DIGITS_FLOW_DIR, DIGITS_FLOW_TEXT_LENGTH
from fora_export.errors import ConfigError
from fora_export.quality.classifier import NUM_CLASSES
from fora_export.quality.conditioning import (
    CLASS_CONDITIONING_FILE,
    class_conditioning,
    load_class_conditioning,
)
from fora_export.quality.sampling import DigitSampler, model_folder
from fora_runtime.manifest import GraphRole, Manifest, load_manifest
from tests.quality.quality_cli import STEPS, rows, small_quality_report

#: Uncached samples score the classifier's accuracy on held-out real digits (96.7%) within
#: this margin: 40 samples make one sample 2.5 points (binomial sd ~3 points at 95%); at 20
#: steps this model's own error on 500 samples is about 0-2 points (README).
ACCURACY_MARGIN = 0.10


@pytest.fixture(scope="module")
def report(digits_flow_engine: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("quality-flow")
    return small_quality_report(digits_flow_engine, out)


def test_builds_as_sd3_flow_matching_with_the_class_table_inputs(digits_flow_engine: Path) -> None:
    manifest = load_manifest(digits_flow_engine)
    assert manifest.model_class == "SD3Transformer2DModel" and manifest.source == "demo-digits-flow"
    assert manifest.denoising is not None and manifest.denoising.scheduler == "flow_match"
    assert manifest.denoising.scheduler_config["shift"] == 3.0  # SD3's, as the training used
    assert GraphRole.GATES in manifest.graphs  # the lean reuse graph and gate table of the family
    tables, null_class = load_class_conditioning(DEMO_DIGITS_FLOW_DIR / CLASS_CONDITIONING_FILE, "test")
    # The build's text length is the table's token count (the demo's build default).
    assert demo_spec("demo-digits-flow").build_defaults["text_length"] == DIGITS_FLOW_TEXT_LENGTH
    assert null_class == NUM_CLASSES
    for spec in manifest.inputs_of("conditioning"):
        assert tables[spec.name].shape == (NUM_CLASSES + 1, *spec.shape[1:])
    assert sorted(tables) == sorted(manifest.conditioning_names)


def test_the_committed_weights_are_small() -> None:
    sizes = sum(path.stat().st_size for path in DEMO_DIGITS_FLOW_DIR.iterdir())
    assert sizes < 4 * 2**20


def test_report_names_the_flow_scheduler_and_every_schedule(report: dict) -> None:
    assert report["scheduler"] == "flow-euler (shift 3)"
    assert [r["num_full"] for r in report["schedules"]] == [STEPS, 7, STEPS, 1]


def test_all_full_steps_equal_no_caching(report: dict) -> None:
    by_label = rows(report)
    reference, same = by_label["no caching (N=1)"], by_label[f"list 1 ({STEPS} full)"]
    assert same["psnr_db"] is None and same["rel_l2"] == 0.0
    assert same["frechet"] == reference["frechet"]


def test_uncached_samples_score_like_real_digits(report: dict) -> None:
    reference = rows(report)["no caching (N=1)"]
    # Within the margin both ways: far above the real digits would mean a broken metric.
    assert abs(reference["accuracy"] - report["classifier_accuracy"]) <= ACCURACY_MARGIN


def test_a_broken_schedule_scores_worse(report: dict) -> None:
    by_label = rows(report)
    reference, fora, broken = by_label["no caching (N=1)"], by_label["N=3 paper"], by_label["list 2 (1 full)"]
    assert broken["psnr_db"] < fora["psnr_db"]
    assert broken["rel_l2"] > fora["rel_l2"]
    # Not the accuracy: the velocity of the first step points at the class's mean digit, so
    # samples that reuse its caches stay recognisable (README); the distance to real digits
    # sees the lost detail and diversity.
    assert broken["frechet"] > 1.3 * reference["frechet"]
    assert broken["frechet"] > fora["frechet"]


def test_grid_is_written(report: dict) -> None:
    assert Path(report["_out"], "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_class_is_fed_its_table_rows(digits_flow_engine: Path) -> None:
    manifest = load_manifest(digits_flow_engine)
    conditioning = class_conditioning(manifest, NUM_CLASSES, "test", model_folder(manifest))
    tables, _ = load_class_conditioning(DEMO_DIGITS_FLOW_DIR / CLASS_CONDITIONING_FILE, "test")
    feeds = conditioning.feeds(np.array([3, 3, 7]))
    for name, table in tables.items():
        np.testing.assert_array_equal(feeds[name], table[[3, 3, 7]])
    assert conditioning.label_input is None  # SD3 takes no labels


def with_text_length(manifest: Manifest, length: int) -> Manifest:
    inputs = tuple(
        dataclasses.replace(spec, shape=(spec.shape[0], length, *spec.shape[2:]))
        if spec.name == "encoder_hidden_states"
        else spec
        for spec in manifest.inputs
    )
    return dataclasses.replace(manifest, inputs=inputs)


def test_conditioning_the_table_cannot_feed_is_refused(digits_flow_engine: Path, tmp_path: Path) -> None:
    manifest = load_manifest(digits_flow_engine)
    folder = model_folder(manifest)
    # A build with another text length than the table's: the fix names the length.
    with pytest.raises(ConfigError, match=f"rebuild with --text-length {DIGITS_FLOW_TEXT_LENGTH}"):
        class_conditioning(with_text_length(manifest, 333), NUM_CLASSES, "ENGINE", folder)
    # A model folder without a table (e.g. an SD3 trained elsewhere).
    with pytest.raises(ConfigError, match=f"no {CLASS_CONDITIONING_FILE}"):
        class_conditioning(manifest, NUM_CLASSES, "ENGINE", tmp_path)
    # A table that is not one.
    (tmp_path / CLASS_CONDITIONING_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="cannot read"):
        class_conditioning(manifest, NUM_CLASSES, "ENGINE", tmp_path)


def test_the_sampler_follows_the_manifests_flow_schedule(digits_flow_engine: Path) -> None:
    manifest = load_manifest(digits_flow_engine)
    sampler = DigitSampler.for_manifest(manifest, 10, NUM_CLASSES, "test")
    sigma = sampler.timesteps / 1000.0  # SD3's graph timestep is sigma * 1000
    # FlowMatchEulerDiscreteScheduler with the recorded shift 3: sigma = 3 u / (1 + 2 u) of
    # evenly spaced u from 1 down; undoing the shift gives those u back.
    u = sigma / (3.0 - 2.0 * sigma)
    assert sigma[0] == pytest.approx(1.0)
    np.testing.assert_allclose(np.diff(u), np.diff(u)[0], rtol=1e-4)
    assert sampler.describe() == "flow-euler (shift 3)"
