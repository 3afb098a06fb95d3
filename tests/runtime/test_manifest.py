from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from fora_runtime import ForaSession, ManifestError, load_manifest
from fora_runtime.manifest import MANIFEST_NAME, SCHEMA_VERSION, Conditioning, ExportRecord, check_graph_set


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


def test_typed_sections_round_trip_and_refuse_unknown_keys(engine_copy: Path) -> None:
    manifest = load_manifest(engine_copy)
    raw = json.loads((engine_copy / MANIFEST_NAME).read_text())
    assert manifest.to_dict() == raw  # the sections write back exactly what they read
    assert manifest.conditioning.kind == "class_labels" and manifest.conditioning.num_classes == 10
    assert manifest.conditioning.input_ranges == {"class_labels": (0, 10)}
    assert manifest.export.reuse_graph == "lean" and manifest.export.cached_kinds == ("attn1", "ff")
    assert Conditioning.from_dict(raw["conditioning"]).to_dict() == raw["conditioning"]
    assert ExportRecord.from_dict(raw["export"]).to_dict() == raw["export"]
    for edit, message in [
        (lambda d: d["conditioning"].update(caption_length=8), "field 'conditioning' has unknown keys"),
        (lambda d: d["conditioning"].update(text_length=0), "'conditioning.text_length' is 0"),
        (lambda d: d["conditioning"].update(kind="sound"), "'conditioning.kind' is 'sound'"),
        (lambda d: d["export"].update(reuse_graph="fast"), "'export.reuse_graph' is 'fast'"),
        (lambda d: d["export"]["adapter_options"].update(cache="attn1"), "adapter_options.cache' is"),
        (lambda d: d["conditioning"]["input_ranges"].update(labels=[0, 1]), "names 'labels', which is not"),
    ]:
        rewrite(engine_copy, edit)
        with pytest.raises(ManifestError, match=re.escape(message)):
            load_manifest(engine_copy, verify="none")
        (engine_copy / MANIFEST_NAME).write_text(json.dumps(raw))


def test_the_graph_contract_is_checked_on_write_too(engine_copy: Path) -> None:
    """A build can never write a folder the runtime refuses: ``write`` checks as ``load`` does
    (the SD3 bug of issue 20: a reuse graph that does not take every cache tensor)."""
    manifest = load_manifest(engine_copy)
    reuse = manifest.graphs["reuse"]
    short = dataclasses.replace(reuse, inputs=reuse.inputs[:-1])
    broken = dataclasses.replace(manifest, graphs={**manifest.graphs, "reuse": short})
    before = (engine_copy / MANIFEST_NAME).read_bytes()
    with pytest.raises(
        ManifestError, match=r"reuse graph does not take every cache tensor \(missing \['cache.1.ff'\]\)"
    ):
        broken.write(engine_copy)
    assert (engine_copy / MANIFEST_NAME).read_bytes() == before
    with pytest.raises(ManifestError, match="reuse graph does not take every cache tensor"):
        check_graph_set(broken.graphs, broken.step_inputs, broken.caches, where="build")
    check_graph_set(manifest.graphs, manifest.step_inputs, manifest.caches, where="build")
    # Out of order, or a cache of another shape.
    swapped = dataclasses.replace(reuse, inputs=(*reuse.inputs[:-2], reuse.inputs[-1], reuse.inputs[-2]))
    with pytest.raises(ManifestError, match=r"reuse graph's inputs are .* expected in the order"):
        check_graph_set(
            {**manifest.graphs, "reuse": swapped}, manifest.step_inputs, manifest.caches, where="b"
        )
    cache = dataclasses.replace(manifest.caches[0], shape=("batch", 16, 8))
    with pytest.raises(
        ManifestError, match=r"'cache.0.attn1' is float32\['batch', 16, 16\], the cache tensor is"
    ):
        check_graph_set(manifest.graphs, manifest.step_inputs, (cache, *manifest.caches[1:]), where="b")
    # A graph file may leave out a conditioning input it does not read, never the latents.
    pruned = dataclasses.replace(reuse, inputs=tuple(t for t in reuse.inputs if t.name != "class_labels"))
    check_graph_set({**manifest.graphs, "reuse": pruned}, manifest.step_inputs, manifest.caches, where="b")
    no_latents = dataclasses.replace(reuse, inputs=reuse.inputs[1:])
    with pytest.raises(ManifestError, match=r"reuse graph lacks the inputs \['latents'\]"):
        check_graph_set(
            {**manifest.graphs, "reuse": no_latents}, manifest.step_inputs, manifest.caches, where="b"
        )
