"""Opening an engine folder: reading ``manifest.json`` (size-capped, contained), its
signature (:mod:`fora_runtime.trust`), parsing it, and checking the files it lists
(contained in the folder, size, stamp or sha256) before any of them is loaded. Stdlib only.

A folder is untrusted input until proven otherwise (docs/trust.md): every
file the manifest names must be a plain name inside the folder (no separators, ``..``,
absolute paths or symlinks leaving it), and that is checked before any of those files is
touched.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fora_runtime.errors import ManifestError
from fora_runtime.manifest.document import Manifest
from fora_runtime.manifest.fields import MAX_MANIFEST_BYTES, MAX_NESTING, check_file_name
from fora_runtime.manifest.schema import MANIFEST_NAME
from fora_runtime.trust import resolve_manifest_key, verify_manifest_signature


def _nesting(data: Any) -> int:
    """The depth of nested lists and objects in ``data`` (iterative: any depth is safe)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            deepest = max(deepest, depth)
            if depth <= MAX_NESTING:
                stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


#: How ``load_manifest`` checks the files a manifest lists: ``stamp`` (default) their size and
#: a stamp of their first and last MiB and 64 samples between (catches truncation, a file of
#: another build, a copy cut short; reads ~2.3 MiB per file), ``full`` every byte's sha256
#: (catches any change; reads everything), ``none`` only that each exists inside the folder.
VerifyMode = Literal["stamp", "full", "none"]
VERIFY_MODES: tuple[str, ...] = ("stamp", "full", "none")
#: The keyword arguments of ``load_manifest`` a session passes through (how a folder is opened).
FOLDER_OPTIONS = ("verify", "manifest_key", "manifest_key_file")
STAMP_EDGE = 1 << 20
STAMP_SAMPLES = 64
STAMP_SAMPLE = 1 << 12


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def stamp_of(path: Path) -> str:
    """sha256 over the size, the first and last MiB and 64 evenly spaced 4 KiB samples of
    ``path`` (the whole file when it is small): cheap, and it changes when a file is cut
    short, extended or replaced by another file. Not proof against a deliberate edit
    between the samples: that is what ``verify="full"`` and signed manifests are for."""
    size = os.stat(path).st_size
    digest = hashlib.sha256(b"fora-stamp-1:%d:" % size)
    with open(path, "rb") as fh:
        if size <= 2 * STAMP_EDGE + STAMP_SAMPLES * STAMP_SAMPLE:
            while block := fh.read(STAMP_EDGE):
                digest.update(block)
            return digest.hexdigest()
        digest.update(fh.read(STAMP_EDGE))
        span = size - 2 * STAMP_EDGE
        for index in range(STAMP_SAMPLES):
            fh.seek(STAMP_EDGE + index * span // STAMP_SAMPLES)
            digest.update(fh.read(STAMP_SAMPLE))
        fh.seek(size - STAMP_EDGE)
        digest.update(fh.read(STAMP_EDGE))
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """The manifest's record of one file: its size, sha256 and stamp."""
    return {"bytes": path.stat().st_size, "sha256": sha256_of(path), "stamp": stamp_of(path)}


def contained_file(folder: Path, name: str) -> Path:
    """``folder/name`` when it is a regular file inside ``folder`` (a symlink to a file in the
    folder counts; one leaving it does not). Checked without reading or stat-ing anything
    outside the folder, so a crafted manifest learns nothing about other files."""
    check_file_name(name, f"{folder}")  # names were checked at parse time; callers may pass others
    base = Path(os.path.realpath(folder))
    path = base / name
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if not target.is_relative_to(base):
            raise ManifestError(
                f"{folder / name} | is a symlink leaving the engine folder | engine folders hold their "
                "files; copy the file in (cp -L) or rebuild"
            )
        path = target
    if not path.is_file():
        what = "not a regular file" if path.exists() else "missing"
        raise ManifestError(f"{folder / name} | {what}, but listed in {MANIFEST_NAME} | rebuild the engines")
    return path


def read_manifest_bytes(folder: Path) -> tuple[Path, bytes]:
    """``folder/manifest.json`` and its bytes: a regular file inside the folder, size-capped."""
    if not folder.exists():
        raise ManifestError(f"Engine folder '{folder}' | does not exist | run `fora-export build` first")
    if not folder.is_dir():
        raise ManifestError(
            f"Engine folder '{folder}' | is not a folder | pass the folder `build --out` wrote"
        )
    path = folder / MANIFEST_NAME
    if not path.exists() and not path.is_symlink():
        raise ManifestError(
            f"{path} | missing | not an engine folder, or its build did not finish; rebuild it"
        )
    try:
        real = contained_file(folder, MANIFEST_NAME)
        size = real.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise ManifestError(
                f"{path} | {size} bytes, more than any manifest ({MAX_MANIFEST_BYTES} bytes) "
                "| rebuild the engines"
            )
        return path, real.read_bytes()
    except OSError as err:
        raise ManifestError(
            f"{path} | cannot be read ({err.strerror or err}) | check its permissions"
        ) from err


def parse_manifest_bytes(raw: bytes, *, where: str) -> Manifest:
    """Parse the bytes of a ``manifest.json`` (UTF-8 JSON of bounded nesting)."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ManifestError(f"{where} | is not valid JSON (not UTF-8: {err}) | rebuild the engines") from err
    except json.JSONDecodeError as err:
        raise ManifestError(f"{where} | is not valid JSON ({err}) | rebuild the engines") from err
    except RecursionError as err:
        raise ManifestError(
            f"{where} | is not valid JSON for this runtime (nested deeper than {MAX_NESTING} levels) "
            "| rebuild the engines"
        ) from err
    if _nesting(data) > MAX_NESTING:
        raise ManifestError(
            f"{where} | nested deeper than {MAX_NESTING} levels, which no manifest is | rebuild the engines"
        )
    return Manifest.from_dict(data, where=where)


@dataclass(frozen=True)
class EngineFolder:
    """An opened engine folder: its parsed manifest and whether a deployer's key signed it."""

    path: Path
    manifest: Manifest
    #: True when the manifest's signature was verified with the deployer's key.
    signed: bool


def open_engine_folder(
    folder: str | Path,
    *,
    verify: VerifyMode = "stamp",
    manifest_key: str | bytes | None = None,
    manifest_key_file: str | Path | None = None,
) -> EngineFolder:
    """Read, check and (with a key) authenticate ``folder/manifest.json``, then its files.

    Order: the manifest's bytes are read (size-capped), their signature is verified when a
    key is given (``manifest_key``, ``manifest_key_file`` or ``FORA_MANIFEST_KEY``; then an
    unsigned folder is refused, and the files are checked in full since a stamp is no
    proof), then parsed and checked, every listed name contained; only then are the listed
    files opened, per ``verify``.
    """
    if verify not in VERIFY_MODES:
        raise ManifestError(f"verify | got {verify!r} | expected one of {', '.join(VERIFY_MODES)}")
    folder = Path(folder)
    key = resolve_manifest_key(manifest_key, manifest_key_file)
    path, raw = read_manifest_bytes(folder)
    if key is not None:
        verify_manifest_signature(folder, raw, key)
        verify = "full"
    manifest = parse_manifest_bytes(raw, where=str(path))
    verify_manifest_files(manifest, folder, verify)
    return EngineFolder(path=folder, manifest=manifest, signed=key is not None)


def load_manifest(
    folder: str | Path,
    *,
    verify: VerifyMode = "stamp",
    manifest_key: str | bytes | None = None,
    manifest_key_file: str | Path | None = None,
) -> Manifest:
    """Read and validate ``folder/manifest.json`` (see :func:`open_engine_folder`).

    Every file listed in the manifest must exist inside the folder with the recorded
    size and stamp (``verify="full"``: sha256); a mismatch means the folder was tampered
    with or copied incompletely.
    """
    return open_engine_folder(
        folder, verify=verify, manifest_key=manifest_key, manifest_key_file=manifest_key_file
    ).manifest


def verify_manifest_files(manifest: Manifest, folder: Path, verify: VerifyMode = "stamp") -> None:
    """Check every listed file: contained in ``folder`` (always, ``none`` included), its size,
    then its stamp (``stamp``; files recorded without one get their sha256 checked) or its
    sha256 (``full``)."""
    calibrated = {file: steps for steps, file in manifest.calibrated_schedules.items()}
    for name in manifest.files:
        fix = "rebuild the engines"
        if name in calibrated:
            fix = f"calibrate again: fora-export calibrate {folder} --steps {calibrated[name]} --full-steps K"
        verify_listed_file(manifest, folder, name, verify, fix=fix)


def verify_listed_file(
    manifest: Manifest,
    folder: Path,
    name: str,
    verify: VerifyMode = "full",
    *,
    fix: str = "rebuild the engines",
) -> Path:
    """Check one listed file as :func:`verify_manifest_files` does; returns its real path."""
    record = manifest.files[name]
    file = Path(folder) / name
    try:
        real = contained_file(Path(folder), name)
    except ManifestError as err:
        raise ManifestError(str(err).replace("| rebuild the engines", f"| {fix}")) from err
    if verify == "none":
        return real
    size = real.stat().st_size
    if size != record.get("bytes"):
        raise ManifestError(
            f"{file} | size {size} bytes, expected {record.get('bytes')} | file is truncated or was "
            f"replaced; {fix}"
        )
    if verify == "stamp" and "stamp" in record:
        if stamp_of(real) != record["stamp"]:
            raise ManifestError(
                f"{file} | its stamp (size, first/last MiB, samples) does not match {MANIFEST_NAME} "
                f"| file was replaced or modified; {fix}"
            )
    elif sha256_of(real) != record.get("sha256"):
        raise ManifestError(f"{file} | sha256 does not match {MANIFEST_NAME} | file was modified; {fix}")
    return real
