"""Trust: torch programs (code when loaded) only from trusted folders, signed manifests,
file stamps, TensorRT plugin lookups cut off for untrusted folders (README, "Trust and
safety")."""

from __future__ import annotations

import builtins
import hashlib
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest

from fora_runtime import BackendError, ForaSession, ManifestError, load_manifest
from fora_runtime.manifest import MANIFEST_NAME, STAMP_EDGE, STAMP_SAMPLE, file_record, stamp_of
from fora_runtime.trust import KEY_ENV, SIGNATURE_NAME, restrict_tensorrt_runtime, sign_folder
from tests.helpers import run_cli

KEY = b"0123456789abcdef0123456789abcdef"


class _Payload:
    """Unpickling it opens (creates) ``marker``: proof that the folder's pickle ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (builtins.open, (self.marker, "w"))


def _relist(folder: Path, *names: str) -> None:
    """Record ``names`` in the manifest as they are now (an attacker controls the folder)."""
    path = folder / MANIFEST_NAME
    data = json.loads(path.read_text())
    for name in names:
        data["files"][name] = file_record(folder / name)
    path.write_text(json.dumps(data))


def plant_payload(folder: Path, program: str, marker: Path) -> None:
    """Replace the (empty) sample inputs of ``program`` with a pickle whose loading creates
    ``marker``: torch.export.load tries weights_only=True, then falls back to a full unpickle."""
    path = folder / program
    crafted = path.with_suffix(".crafted")
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(crafted, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("data/sample_inputs/model.pt"):
                data = pickle.dumps(_Payload(str(marker)))
            target.writestr(info, data)
    crafted.replace(path)
    _relist(folder, program)


@pytest.fixture
def crafted_engine(tiny_torch_engine: Path, tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "crafted"
    shutil.copytree(tiny_torch_engine, folder)
    marker = tmp_path / "payload-ran"
    plant_payload(folder, "full.pt2", marker)
    return folder, marker


def test_a_crafted_program_does_not_run_under_the_default_settings(crafted_engine: tuple[Path, Path]) -> None:
    folder, marker = crafted_engine
    load_manifest(folder)  # the manifest vouches for the file: its sha256 cannot protect
    session = ForaSession(folder, backend="torch", device="cpu")
    with pytest.raises(BackendError, match=r"full\.pt2 \| not loaded: torch programs run code .* --trust"):
        session.activate()
    assert not marker.exists()
    # Vouching for the folder loads it, and the payload is live: why the default refuses.
    with pytest.raises(BackendError), ForaSession(folder, backend="torch", device="cpu", trust_programs=True):
        pass
    assert marker.exists()


def test_the_cli_refuses_untrusted_programs_in_one_line(crafted_engine: tuple[Path, Path]) -> None:
    folder, marker = crafted_engine
    for command in (["bench", "--no-eager"], ["validate"]):
        result = run_cli(command[0], str(folder), "--backend", "torch", *command[1:])
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("error: ") and "--trust" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not marker.exists()


@pytest.fixture
def signed_engine(tiny_torch_engine: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "signed"
    shutil.copytree(tiny_torch_engine, folder)
    sign_folder(folder, KEY)
    return folder


def test_a_signed_folder_is_trusted_under_the_key(
    signed_engine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(BackendError, match="not trusted"):  # no key: unsigned as far as we know
        ForaSession(signed_engine, backend="torch", device="cpu").activate()
    monkeypatch.setenv(KEY_ENV, KEY.decode())
    with ForaSession(signed_engine, backend="torch", device="cpu") as session:
        assert session.trusted
    key_file = signed_engine.parent / "fora.key"
    key_file.write_bytes(KEY + b"\n")
    monkeypatch.delenv(KEY_ENV)
    assert ForaSession(signed_engine, manifest_key_file=key_file).trusted


def test_the_signature_is_checked_before_any_file_is_read(
    signed_engine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY.decode())
    manifest = signed_engine / MANIFEST_NAME
    data = json.loads(manifest.read_text())
    data["source"] = "someone else"
    manifest.write_text(json.dumps(data))
    (signed_engine / "full.onnx").unlink()  # were files read first, this would be the error
    with pytest.raises(ManifestError, match=rf"{SIGNATURE_NAME} \| does not match manifest.json"):
        load_manifest(signed_engine)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("unsigned", r"missing: the folder is not signed, and a manifest key is set"),
        ("other key", r"does not match manifest.json under this key"),
        ("short key", r"too short to sign with"),
    ],
)
def test_a_key_refuses_unsigned_or_foreign_folders(
    engine_copy: Path, monkeypatch: pytest.MonkeyPatch, setup: str, message: str
) -> None:
    if setup == "other key":
        sign_folder(engine_copy, b"another key of 32 bytes, exactly")
    monkeypatch.setenv(KEY_ENV, "short" if setup == "short key" else KEY.decode())
    with pytest.raises(ManifestError, match=message):
        ForaSession(engine_copy)


def test_signed_folders_are_checked_in_full(tmp_path: Path, engine_copy: Path) -> None:
    """A stamp samples a large file; a byte changed between the samples passes it (it is a
    check against accidents, not attacks). ``verify="full"`` and a signed folder catch it."""
    large = engine_copy / "weights.bin"
    large.write_bytes(bytes(range(256)) * (3 * STAMP_EDGE // 256))
    _relist(engine_copy, "weights.bin")
    data = bytearray(large.read_bytes())
    data[STAMP_EDGE + STAMP_SAMPLE + 100] ^= 0xFF  # between the first two samples
    large.write_bytes(bytes(data))
    load_manifest(engine_copy)  # stamp: passes
    with pytest.raises(ManifestError, match=r"weights\.bin \| sha256 does not match"):
        load_manifest(engine_copy, verify="full")
    sign_folder(engine_copy, KEY)
    with pytest.raises(ManifestError, match=r"weights\.bin \| sha256 does not match"):
        load_manifest(engine_copy, manifest_key=KEY)


def test_the_stamp_catches_truncation_and_replacement(tmp_path: Path) -> None:
    path = tmp_path / "graph.bin"
    content = hashlib.sha256(b"seed").digest() * (5 * STAMP_EDGE // 32)
    path.write_bytes(content)
    stamp = stamp_of(path)
    path.write_bytes(content[: len(content) - 1])
    assert stamp_of(path) != stamp  # truncated
    path.write_bytes(hashlib.sha256(b"other").digest() * (5 * STAMP_EDGE // 32))
    assert stamp_of(path) != stamp  # another file of the same size
    path.write_bytes(content)
    assert stamp_of(path) == stamp


def test_old_folders_without_stamps_get_their_sha256_checked(engine_copy: Path) -> None:
    manifest = engine_copy / MANIFEST_NAME
    data = json.loads(manifest.read_text())
    for record in data["files"].values():
        record.pop("stamp")
    manifest.write_text(json.dumps(data))
    load_manifest(engine_copy)
    with open(engine_copy / "reuse.onnx", "r+b") as fh:
        fh.seek(10)
        fh.write(b"X")
    with pytest.raises(ManifestError, match=r"reuse\.onnx \| sha256 does not match"):
        load_manifest(engine_copy)


def test_untrusted_tensorrt_runtimes_see_no_plugins() -> None:
    """The real TensorRT-RTX runtime (it constructs without a GPU): an untrusted folder's
    plans are deserialised with the global plugin registry out of reach and host code off."""
    trt = pytest.importorskip("tensorrt_rtx_bindings")
    logger = trt.Logger(trt.Logger.ERROR)
    trusted, untrusted = trt.Runtime(logger), trt.Runtime(logger)
    restrict_tensorrt_runtime(trusted, trusted=True)
    restrict_tensorrt_runtime(untrusted, trusted=False)
    assert trusted.get_plugin_registry().parent_search_enabled
    assert untrusted.get_plugin_registry().parent_search_enabled is False
    assert untrusted.get_plugin_registry().all_creators_recursive == []
    assert untrusted.engine_host_code_allowed is False


def test_the_cli_signs_and_checks_signatures(tiny_dit_dir: Path, tmp_path: Path, engine_copy: Path) -> None:
    key_file = tmp_path / "fora.key"
    key_file.write_text(KEY.decode() + "\n")
    out = tmp_path / "signed"
    result = run_cli("build", str(tiny_dit_dir), "--out", str(out), "--sign-key", str(key_file))
    assert result.exit_code == 0 and f"signed: {out / SIGNATURE_NAME}" in result.stdout, result.output
    assert run_cli("info", str(out), "--key-file", str(key_file)).exit_code == 0
    refused = run_cli("info", str(engine_copy), "--key-file", str(key_file))  # unsigned
    assert refused.exit_code == 2 and "the folder is not signed" in refused.stderr
