"""``fora-export calibrate``: the exact choice, the schedule file, and its use by the runtime."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from fora_export.calibrate import accumulated_drift, select_full_steps, uniform_full_steps
from fora_runtime import ForaSession, ManifestError, ScheduleError, load_manifest
from fora_runtime.calibration import read_calibration
from tests.helpers import one_error_line, run_cli

STEPS = 9
BUDGET = 4


def calibrate(engine: Path, steps: int = STEPS, budget: int = BUDGET, *extra: str) -> dict:
    code, stdout, stderr = run_cli(
        "calibrate", str(engine), "--steps", str(steps), "--full-steps", str(budget), "--samples", "3",
        "--batch", "3", "--json", *extra,
    )  # fmt: skip
    assert code == 0, stderr
    return json.loads(stdout)


def test_selection_is_the_exact_minimum_of_the_accumulated_drift() -> None:
    rng = np.random.default_rng(0)
    for trial in range(6):
        change = [None, *rng.random(STEPS - 1)]
        if trial == 0:
            change = [None, *([0.1] * (STEPS - 1))]  # flat: ties broken the same way every time
        for budget in range(1, STEPS + 1):
            chosen, cost = select_full_steps(change, budget)
            assert len(chosen) == budget and chosen[0] == 0
            assert cost == pytest.approx(accumulated_drift(change, chosen))
            best = min(
                accumulated_drift(change, (0, *rest))
                for rest in itertools.combinations(range(1, STEPS), budget - 1)
            )
            assert cost == pytest.approx(best, abs=1e-12)


def test_accumulated_drift_and_where_change_concentrates() -> None:
    # Full at 0 and 2 of 4 steps: step 1 has drifted 1, step 3 has drifted 5.
    assert accumulated_drift([None, 1.0, 2.0, 5.0], (0, 2)) == pytest.approx(1.0 + 5.0)
    # All change in the last steps: the full steps move there (evenly spaced would not).
    change = [None, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    chosen, cost = select_full_steps(change, 4)
    assert chosen == (0, 6, 7, 8) and cost == 0.0
    assert accumulated_drift(change, uniform_full_steps(9, 4)) > 0
    assert uniform_full_steps(9, 4) == (0, 2, 4, 6)


def test_calibrate_writes_a_listed_file_the_runtime_plans_with(engine_copy: Path) -> None:
    data = calibrate(engine_copy)
    manifest = load_manifest(engine_copy)  # verifies the new file's sha256 with the others
    name = manifest.calibrated_schedules[STEPS]
    assert name == data["file"] and name in manifest.files
    record = read_calibration(manifest, engine_copy, STEPS)
    assert record.steps == STEPS and len(record.full_steps) == BUDGET and record.full_steps[0] == 0
    assert record.scheduler["name"] == "ddim" and record.samples == 3 and len(record.timesteps) == STEPS
    assert record.full_steps == select_full_steps(record.change["rel_l1"], BUDGET)[0]
    for curve in record.change.values():  # relative change of every step from the one before
        assert curve[0] is None and all(value > 0 for value in curve[1:])
    with ForaSession(engine_copy, schedule="calibrated") as session:
        generation = session.start(STEPS, 2)
        assert tuple(k for k, full in enumerate(generation.plan) if full) == record.full_steps
        with pytest.raises(ScheduleError, match=f"has one for {STEPS} steps only, the generation has 5"):
            session.start(5, 2)
        assert session.start(5, 2, schedule=manifest.schedule).num_steps == 5  # others still plan

    # Recalibrating the step count replaces the file; another step count adds one.
    again = calibrate(engine_copy, STEPS, 2, "--metric", "l2", "--seed", "3")
    calibrate(engine_copy, 6, 3)
    manifest = load_manifest(engine_copy)
    assert sorted(manifest.calibrated_schedules) == [6, STEPS]
    assert manifest.calibrated_schedules[STEPS] == again["file"] != name
    assert not (engine_copy / name).exists() and name not in manifest.files


def test_validate_checks_a_calibrated_schedule(engine_copy: Path) -> None:
    data = calibrate(engine_copy)
    code, stdout, stderr = run_cli("validate", str(engine_copy), "--schedule", "calibrated", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["trajectory"]["steps"] == STEPS  # the calibrated step count by default
    assert report["trajectory"]["ran_full_steps"] == data["full_steps"]
    [check] = report["calibrated"]
    assert check["passed"] and check["planned_full_steps"] == check["ran_full_steps"] == data["full_steps"]


def test_bad_calibrated_inputs_are_one_line_errors(engine_copy: Path) -> None:
    code, _, stderr = run_cli("validate", str(engine_copy), "--schedule", "calibrated", "--steps", "5")
    assert code == 2 and "has none" in one_error_line(stderr)
    calibrate(engine_copy)
    # Another step count than the calibrated one.
    code, _, stderr = run_cli("validate", str(engine_copy), "--schedule", "calibrated", "--steps", "5")
    assert code == 2 and f"one for {STEPS} steps only" in one_error_line(stderr)
    # --full-steps beyond the step count, checked before anything runs.
    code, _, stderr = run_cli("calibrate", str(engine_copy), "--steps", "4", "--full-steps", "5")
    assert code == 2 and "--full-steps" in one_error_line(stderr)

    # A corrupted schedule file: refused when the folder is read and when the schedule is.
    path = engine_copy / load_manifest(engine_copy).calibrated_schedules[STEPS]
    path.write_text(path.read_text().replace('"full_steps": [\n  0', '"full_steps": [\n  1'))
    code, _, stderr = run_cli("info", str(engine_copy))
    assert code == 2 and "calibrate again" in one_error_line(stderr)
    manifest = load_manifest(engine_copy, verify="none")
    with pytest.raises(ManifestError, match="sha256 does not match"):
        read_calibration(manifest, engine_copy, STEPS)
    # Calibrating again repairs the folder (the broken file does not stop it).
    calibrate(engine_copy)
    load_manifest(engine_copy)


def test_a_malformed_file_with_a_matching_sha256_is_refused(engine_copy: Path) -> None:
    import dataclasses
    import hashlib

    calibrate(engine_copy)
    manifest = load_manifest(engine_copy)
    name = manifest.calibrated_schedules[STEPS]
    data = json.loads((engine_copy / name).read_text())
    data["full_steps"] = [0, STEPS + 3]
    text = json.dumps(data).encode()
    (engine_copy / name).write_bytes(text)
    files = {**manifest.files, name: {"bytes": len(text), "sha256": hashlib.sha256(text).hexdigest()}}
    dataclasses.replace(manifest, files=files).write(engine_copy)
    with pytest.raises(ManifestError, match="are not a schedule of 9 steps"):
        ForaSession(engine_copy, schedule="calibrated").start(STEPS, 2)


def test_a_signed_folder_is_re_signed_with_its_key_or_refused(engine_copy: Path, tmp_path: Path) -> None:
    from fora_runtime.trust import sign_folder

    key_file = tmp_path / "fora.key"
    key_file.write_text("0123456789abcdef0123456789abcdef\n")
    sign_folder(engine_copy, key_file.read_bytes().rstrip(b"\n"))
    code, _, stderr = run_cli("calibrate", str(engine_copy), "--steps", str(STEPS), "--full-steps", "3")
    assert code == 2 and "is signed" in one_error_line(stderr)
    assert not load_manifest(engine_copy).calibrated_schedules  # refused before any work
    calibrate(engine_copy, STEPS, BUDGET, "--key-file", str(key_file))
    manifest = load_manifest(engine_copy, manifest_key_file=key_file)  # the new signature holds
    assert STEPS in manifest.calibrated_schedules


def test_a_malformed_calibrated_schedules_entry_is_a_manifest_error(engine_copy: Path) -> None:
    path = engine_copy / "manifest.json"
    data = json.loads(path.read_text())
    for entry in ({"nine": "x.json"}, {"9": "../outside.json"}, {"9": "missing.json"}):
        path.write_text(json.dumps({**data, "calibrated_schedules": entry}))
        with pytest.raises(ManifestError, match=r"calibrated_schedules|calibrated schedule"):
            load_manifest(engine_copy, verify="none")
