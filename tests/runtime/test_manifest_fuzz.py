"""A manifest is untrusted input: whatever it holds, reading it (and printing it, and
opening a session on it) fails with a ForaError or succeeds, never with another exception;
every file it names stays inside the folder, checked before any file is touched."""

from __future__ import annotations

import copy
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from fora_export.reports import print_manifest
from fora_runtime import ForaError, ForaSession, ManifestError, load_manifest
from fora_runtime.manifest import MANIFEST_NAME, Manifest, parse_manifest_bytes, verify_manifest_files

#: Values of the wrong type, of absurd size, or nested, put in place of every field.
WRONG_VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    2**70,
    1.5,
    float("nan"),
    "",
    "x[/b]",
    "../../outside/full.onnx",
    [],
    {},
    [[[[[[1]]]]]],
    {"a": {"b": {"c": [1, {"d": None}]}}},
]


def _paths(data: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every field of the manifest: object keys, and the first and last element of lists
    (the others repeat their structure)."""
    if path:
        yield path
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _paths(value, (*path, key))
    elif isinstance(data, list) and data:
        for index in sorted({0, len(data) - 1}):
            yield from _paths(data[index], (*path, index))


def _replace(data: Any, path: tuple[Any, ...], value: Any) -> Any:
    edited = copy.deepcopy(data)
    target = edited
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return edited


#: Values that could break printing (markup, huge numbers, nesting); the others are parsed
#: and verified only (printing every accepted case would triple the test's time).
PRINTED = ("x[/b]", 2**70, {"a": {"b": {"c": [1, {"d": None}]}}})


def _open(raw: bytes, folder: Path, *, files: bool, printed: bool) -> Manifest:
    """Read a manifest, verify its files (when ``files`` changed) and print it as ``info``
    and ``info --json`` do (when ``printed``)."""
    manifest = parse_manifest_bytes(raw, where="fuzzed manifest.json")
    if files:
        verify_manifest_files(manifest, folder)
    if printed:
        print_manifest(manifest, folder, console=Console(file=io.StringIO(), width=100))
        json.dumps(manifest.to_dict())
    return manifest


def test_every_field_of_the_wrong_type_is_a_manifest_error(tiny_torch_engine: Path) -> None:
    folder = tiny_torch_engine
    original = json.loads((folder / MANIFEST_NAME).read_text())
    fields = list(_paths(original))
    assert len(fields) > 150  # the whole manifest: graphs, inputs, caches, files, torch record
    outcomes = {"ManifestError": 0, "accepted": 0}
    for path in fields:
        for value in WRONG_VALUES:
            raw = json.dumps(_replace(original, path, value)).encode()
            try:
                _open(raw, folder, files=path[0] == "files", printed=any(value == v for v in PRINTED))
            except ManifestError:
                outcomes["ManifestError"] += 1
                continue
            except Exception as err:  # what the test is for: a traceback is a bug
                pytest.fail(f"{'.'.join(map(str, path))} = {value!r}: {type(err).__name__}: {err}")
            outcomes["accepted"] += 1
    assert outcomes["ManifestError"] > outcomes["accepted"] > 0, outcomes


def test_the_torch_record_is_checked_as_untrusted_data(tiny_torch_engine: Path, tmp_path: Path) -> None:
    """Sessions on every variant of the record: ForaErrors only, and no program loads."""
    import shutil

    folder = tmp_path / "engine"
    shutil.copytree(tiny_torch_engine, folder)
    original = json.loads((folder / MANIFEST_NAME).read_text())
    record_fields = [p for p in _paths(original) if p[:2] == ("backends", "torch")]
    for path in record_fields:
        for value in WRONG_VALUES:
            (folder / MANIFEST_NAME).write_text(json.dumps(_replace(original, path, value)))
            try:
                ForaSession(folder, backend="torch", device="cpu").activate()
            except ForaError:
                continue
            except Exception as err:
                pytest.fail(f"{'.'.join(map(str, path))} = {value!r}: {type(err).__name__}: {err}")
            pytest.fail(f"{'.'.join(map(str, path))} = {value!r}: an untrusted folder's programs loaded")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"[" * 200_000 + b"]" * 200_000, "nested deeper than"),
        (b'{"a": ' * 40 + b"1" + b"}" * 40, "nested deeper than 32 levels"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1, 2]", "top level is not a JSON object"),
        (b'{"schema_version": true}', "schema_version true is not supported"),
        (b"", "is not valid JSON"),
    ],
)
def test_malformed_manifest_files(engine_copy: Path, content: bytes, message: str) -> None:
    (engine_copy / MANIFEST_NAME).write_bytes(content)
    with pytest.raises(ManifestError, match=message):
        load_manifest(engine_copy)


def test_manifest_json_that_is_a_folder(engine_copy: Path) -> None:
    (engine_copy / MANIFEST_NAME).unlink()
    (engine_copy / MANIFEST_NAME).mkdir()
    with pytest.raises(ManifestError, match=r"manifest\.json \| not a regular file"):
        load_manifest(engine_copy)


def test_a_huge_manifest_is_not_read(engine_copy: Path) -> None:
    with open(engine_copy / MANIFEST_NAME, "r+b") as fh:
        fh.truncate(65 * 2**20)  # sparse: no 65 MiB written
    with pytest.raises(ManifestError, match="more than any manifest"):
        load_manifest(engine_copy)


# -- containment --------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A file outside the engine folder whose size must not leak (12345 bytes)."""
    (tmp_path / "outside").mkdir()
    secret = tmp_path / "outside" / "full.onnx"
    secret.write_bytes(b"s" * 12345)
    return secret


def _point_full_graph_at(folder: Path, name: str) -> None:
    path = folder / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["files"][name] = data["files"].pop("full.onnx")
    data["graphs"]["full"]["file"] = name
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("kind", ["relative", "absolute", "dot-dot name", "hidden", "separator"])
def test_manifest_names_escaping_the_folder_are_refused_before_any_file_is_touched(
    engine_copy: Path, outside: Path, kind: str
) -> None:
    name = {
        "relative": "../../outside/full.onnx",
        "absolute": str(outside),
        "dot-dot name": "..",
        "hidden": ".full.onnx",
        "separator": "sub\\full.onnx",
    }[kind]
    # From the engine folder (tmp/engine), ../../outside is tmp's sibling; make it reachable.
    if kind == "relative":
        name = os.path.relpath(outside, engine_copy)
    _point_full_graph_at(engine_copy, name)
    for verify in ("stamp", "none"):  # the names are refused by parsing alone
        with pytest.raises(ManifestError, match="plain names inside it") as caught:
            load_manifest(engine_copy, verify=verify)  # type: ignore[arg-type]
        assert "12345" not in str(caught.value)


def test_a_symlink_leaving_the_folder_is_refused(engine_copy: Path, outside: Path) -> None:
    (engine_copy / "full.onnx").unlink()
    (engine_copy / "full.onnx").symlink_to(outside)
    for verify in ("stamp", "none"):
        with pytest.raises(ManifestError, match=r"full\.onnx \| is a symlink leaving the engine") as caught:
            load_manifest(engine_copy, verify=verify)  # type: ignore[arg-type]
        assert "12345" not in str(caught.value)
    (engine_copy / MANIFEST_NAME).rename(engine_copy / "real-manifest.json")
    (engine_copy / MANIFEST_NAME).symlink_to(outside)
    with pytest.raises(ManifestError, match=r"manifest\.json \| is a symlink leaving"):
        load_manifest(engine_copy)


def test_a_symlink_inside_the_folder_is_followed(engine_copy: Path) -> None:
    (engine_copy / "full.onnx").rename(engine_copy / "full-graph.bin")
    (engine_copy / "full.onnx").symlink_to("full-graph.bin")
    path = engine_copy / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["files"]["full-graph.bin"] = data["files"]["full.onnx"]
    path.write_text(json.dumps(data))
    load_manifest(engine_copy)
