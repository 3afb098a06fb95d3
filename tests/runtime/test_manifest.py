from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fora_runtime import ForaSession, ManifestError, load_manifest
from fora_runtime.manifest import MANIFEST_NAME, SCHEMA_VERSION


def rewrite(folder: Path, edit) -> None:
    path = folder / MANIFEST_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_manifest_records_what_the_runtime_needs(tiny_engine: Path) -> None:
    manifest = load_manifest(tiny_engine)
    assert manifest.schema_version == SCHEMA_VERSION
    assert manifest.model_class == "DiTTransformer2DModel"
    assert manifest.resolution == (8, 8)
    assert str(manifest.batch) == "1:2:4"
    assert [c.name for c in manifest.caches] == ["cache.0.attn1", "cache.0.ff", "cache.1.attn1", "cache.1.ff"]
    assert all(c.shape == ("batch", 16, 16) for c in manifest.caches)
    full, reuse = manifest.graphs["full"], manifest.graphs["reuse"]
    assert [t.name for t in full.outputs] == ["prediction", *(c.name for c in manifest.caches)]
    assert [t.name for t in reuse.inputs][3:] == [c.name for c in manifest.caches]
    assert full.inputs[0].shape == ("batch", 4, 8, 8)
    assert {t.name: t.dtype for t in full.inputs} == {
        "latents": "float32",
        "timestep": "float32",
        "class_labels": "int64",
    }
    assert set(manifest.files) == {"full.onnx", "reuse.onnx", "gates.onnx", "reuse_gated.onnx"}
    # The DiT gate table: two gates per block, then the final layer's shift and scale.
    assert manifest.has_gate_table and manifest.gate_table_shape == (2 * 2 + 2, 16)
    assert [t.name for t in manifest.graphs["reuse_gated"].inputs] == [
        "latents",
        "gates",
        *(c.name for c in manifest.caches),
    ]
    assert {"torch", "diffusers", "onnx"} <= set(manifest.tools)
    assert manifest.export.opset == 17


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nope")


def test_missing_manifest(engine_copy: Path) -> None:
    (engine_copy / MANIFEST_NAME).unlink()
    with pytest.raises(ManifestError, match=re.escape("manifest.json | missing")):
        ForaSession(engine_copy)


def test_corrupt_manifest(engine_copy: Path) -> None:
    (engine_copy / MANIFEST_NAME).write_text("{ not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(engine_copy)


def test_a_folder_of_the_previous_schema_says_rebuild(engine_copy: Path) -> None:
    """Schema 1 folders (no input roles, no denoising contract) are refused with the fix."""

    def downgrade(data: dict) -> None:
        data.update(schema_version=1)
        del data["inputs"], data["denoising"]

    rewrite(engine_copy, downgrade)
    with pytest.raises(ManifestError, match=r"schema_version 1 is not supported .*rebuild the engines"):
        load_manifest(engine_copy)


def test_input_roles_are_checked(engine_copy: Path) -> None:
    rewrite(engine_copy, lambda d: d["inputs"][1].update(role="latents"))
    with pytest.raises(ManifestError, match="exactly one 'latents' and one 'timestep'"):
        load_manifest(engine_copy)
    rewrite(engine_copy, lambda d: d["inputs"][1].update(role="timestep", name="t"))
    with pytest.raises(ManifestError, match="input 'timestep' is not a step input"):
        load_manifest(engine_copy)


def test_unknown_schema_version(engine_copy: Path) -> None:
    rewrite(engine_copy, lambda d: d.update(schema_version=99))
    with pytest.raises(ManifestError, match="schema_version 99 is not supported"):
        load_manifest(engine_copy)


def test_missing_field(engine_copy: Path) -> None:
    rewrite(engine_copy, lambda d: d.pop("caches"))
    with pytest.raises(ManifestError, match="field 'caches' is missing"):
        load_manifest(engine_copy)


def test_missing_graph_file(engine_copy: Path) -> None:
    (engine_copy / "reuse.onnx").unlink()
    with pytest.raises(ManifestError, match=re.escape("reuse.onnx | missing")):
        load_manifest(engine_copy)


def test_truncated_graph_file(engine_copy: Path) -> None:
    path = engine_copy / "full.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ManifestError, match="truncated"):
        load_manifest(engine_copy)


def test_tampered_graph_file(engine_copy: Path) -> None:
    path = engine_copy / "full.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"its stamp .* does not match"):
        load_manifest(engine_copy)
    with pytest.raises(ManifestError, match="sha256 does not match"):
        load_manifest(engine_copy, verify="full")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["files"].update({"full.onnx": "x"}), "'files.full.onnx' is \"x\", expected an object"),
        (lambda d: d["caches"][0].update(shape=["batch", "foo", 4]), "field 'caches[0].shape[1]' is \"foo\""),
        (lambda d: d["conditioning"].update(input_ranges={"class_labels": 5}), "input_ranges"),
        (lambda d: d.update(resolution="big"), "field 'resolution' is \"big\", expected a list"),
        (lambda d: d["graphs"]["full"].update(inputs=None), "'graphs.full.inputs' is null, expected a list"),
        (lambda d: d.update(files=[]), "field 'files' is list, expected an object"),
        (lambda d: d["files"].pop("reuse.onnx"), "is not listed in 'files'"),
    ],
)
def test_malformed_nested_fields(engine_copy: Path, edit, message: str) -> None:
    rewrite(engine_copy, edit)
    with pytest.raises(ManifestError, match=re.escape(message)):
        load_manifest(engine_copy)
