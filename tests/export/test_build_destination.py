"""Where a build lands: ``--force`` replaces engine folders only, builds killed earlier are
cleaned up, a destination another process created meanwhile is never replaced, a full
disk is one line naming the file (the export itself is faked: these tests are about the
folder, so they copy the session's tiny engine instead of exporting)."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from fora_export.builder import destination, pipeline
from fora_export.builder.config import BuildConfig
from fora_export.errors import BuildError, ExportError
from fora_runtime import load_manifest
from fora_runtime.manifest import MANIFEST_NAME


@pytest.fixture
def fake_export(tiny_engine: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """``export_folder`` copying the tiny engine; returns the folders it wrote."""
    written: list[Path] = []

    def export(loaded, folder: Path, config, stages, *, tensorrt_flavor=None):
        shutil.copytree(tiny_engine, folder, dirs_exist_ok=True)
        written.append(folder)
        return load_manifest(folder)

    monkeypatch.setattr(pipeline, "export_folder", export)
    return written


def build(model: Path, out: Path, **options) -> pipeline.BuildResult:
    return pipeline.build(str(model), out, BuildConfig(), progress=False, **options)


def dead_pid() -> int:
    """The id of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize(
    ("manifest", "reason"),
    [('{"hello": 1}', "schema_version null is not supported"), ("not json", "is not valid JSON")],
)
def test_force_refuses_a_folder_whose_manifest_is_not_an_engine_manifest(
    tiny_dit_dir: Path, tmp_path: Path, fake_export: list[Path], manifest: str, reason: str
) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / MANIFEST_NAME).write_text(manifest)
    (folder / "thesis.tex").write_text("keep me")
    with pytest.raises(BuildError, match=f"not an engine folder \\(.*{reason}"):
        build(tiny_dit_dir, folder, force=True)
    assert (folder / "thesis.tex").read_text() == "keep me" and not fake_export


def test_force_refuses_an_engine_folder_holding_other_files(
    tiny_dit_dir: Path, engine_copy: Path, fake_export: list[Path]
) -> None:
    (engine_copy / "notes.txt").write_text("keep me")
    with pytest.raises(BuildError, match=r"holds files its manifest does not list \(notes\.txt\)"):
        build(tiny_dit_dir, engine_copy, force=True)
    assert (engine_copy / "notes.txt").exists()


def test_force_replaces_an_engine_folder(
    tiny_dit_dir: Path, engine_copy: Path, fake_export: list[Path]
) -> None:
    (engine_copy / "full.onnx").write_bytes(b"old")  # the old build, whatever state it is in
    build(tiny_dit_dir, engine_copy, force=True)
    load_manifest(engine_copy)
    assert sorted(p.name for p in engine_copy.parent.iterdir()) == [engine_copy.name]


def test_stale_build_folders_of_dead_processes_are_removed(
    tiny_dit_dir: Path, tmp_path: Path, fake_export: list[Path]
) -> None:
    out = tmp_path / "engine"
    stale = tmp_path / f".engine.building-{dead_pid()}"
    stale.mkdir()
    (stale / "full.onnx").write_bytes(b"half a graph")
    other = tmp_path / f".other.building-{dead_pid()}"  # another --out's: not ours to judge
    other.mkdir()
    build(tiny_dit_dir, out)
    assert not stale.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "engine"]


def test_a_folder_left_moved_aside_is_put_back_first(
    tiny_dit_dir: Path, engine_copy: Path, fake_export: list[Path]
) -> None:
    """A build killed between its two renames left the previous engines aside."""
    aside = engine_copy.parent / f".{engine_copy.name}.old-{dead_pid()}"
    engine_copy.rename(aside)
    with pytest.raises(BuildError, match="already exists"):  # back in place: not silently replaced
        build(tiny_dit_dir, engine_copy)
    assert not aside.exists()
    load_manifest(engine_copy)


def test_a_running_build_to_the_same_out_is_refused(tiny_dit_dir: Path, tmp_path: Path) -> None:
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f".engine.building-{running.pid}").mkdir()
        with pytest.raises(BuildError, match=f"another build \\(process {running.pid}\\) is writing it now"):
            build(tiny_dit_dir, tmp_path / "engine")
    finally:
        running.kill()
        running.wait()


def test_a_destination_created_meanwhile_is_not_replaced(
    tiny_dit_dir: Path, tmp_path: Path, tiny_engine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two builds to one new --out: the one finishing second fails and replaces nothing."""
    out = tmp_path / "engine"

    def export(loaded, folder: Path, config, stages, *, tensorrt_flavor=None):
        shutil.copytree(tiny_engine, out)  # the other build finished while this one exported
        (out / "first.txt").write_text("the first build's")
        shutil.copytree(tiny_engine, folder, dirs_exist_ok=True)
        return load_manifest(folder)

    monkeypatch.setattr(pipeline, "export_folder", export)
    with pytest.raises(BuildError, match="was created by another process while this build ran"):
        build(tiny_dit_dir, out)
    assert (out / "first.txt").read_text() == "the first build's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


def test_force_rechecks_the_destination_at_the_move(
    tiny_dit_dir: Path, engine_copy: Path, tiny_engine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checked at the start and again when moved aside: a folder of other files swapped in
    meanwhile is put back, untouched."""

    def export(loaded, folder: Path, config, stages, *, tensorrt_flavor=None):
        shutil.rmtree(engine_copy)
        engine_copy.mkdir()
        (engine_copy / "thesis.tex").write_text("keep me")
        shutil.copytree(tiny_engine, folder, dirs_exist_ok=True)
        return load_manifest(folder)

    monkeypatch.setattr(pipeline, "export_folder", export)
    with pytest.raises(BuildError, match="not an engine folder"):
        build(tiny_dit_dir, engine_copy, force=True)
    assert (engine_copy / "thesis.tex").read_text() == "keep me"
    assert sorted(p.name for p in engine_copy.parent.iterdir()) == [engine_copy.name]


def test_a_full_disk_names_the_file_and_the_space_needed(
    tiny_dit_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def export(loaded, folder: Path, config, stages, *, tensorrt_flavor=None):
        (folder / "full.onnx").write_bytes(b"x" * 1000)
        full = OSError(errno.ENOSPC, "No space left on device", str(folder / "full.onnx"))
        raise ExportError("full.onnx | torch.onnx.export failed: OSError") from full

    monkeypatch.setattr(pipeline, "export_folder", export)
    out = tmp_path / "engine"
    with pytest.raises(
        BuildError, match=r"engine/full\.onnx \| no space left on the device .* after writing 1000 B "
    ):
        build(tiny_dit_dir, out)
    assert list(tmp_path.iterdir()) == []


def test_a_disk_too_small_is_refused_before_exporting(
    tiny_dit_dir: Path, tmp_path: Path, fake_export: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(destination.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 100, 100))
    with pytest.raises(BuildError, match=r"needs at least .* \(the model's weights .*\), 100 B free there"):
        build(tiny_dit_dir, tmp_path / "engine")
    assert not fake_export and list(tmp_path.iterdir()) == []


def test_signed_builds(tiny_dit_dir: Path, tmp_path: Path, fake_export: list[Path]) -> None:
    key = b"k" * 32
    out = tmp_path / "engine"
    build(tiny_dit_dir, out, sign_key=key)
    assert (out / "manifest.json.hmac").is_file()
    load_manifest(out, manifest_key=key)
    data = json.loads((out / MANIFEST_NAME).read_text())
    assert "manifest.json.hmac" not in data["files"]
