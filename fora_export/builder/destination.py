"""The build's destination folder, written atomically.

A build writes into a hidden temporary sibling of ``--out`` (``.<out>.building-<pid>``)
and moves it into place only when everything (graphs, checks, manifest) succeeded, so a
failed or interrupted build never leaves a folder claiming graphs that do not exist. The
move is the only step that touches ``--out``: it never replaces a folder another process
created meanwhile (``rename`` onto a non-empty folder fails), and with ``--force`` it
replaces only an engine folder (its manifest parses, it holds nothing the manifest does
not list). Hidden folders left by builds that were killed are removed by the next build
to the same ``--out`` (a previous folder found moved aside is put back).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from pathlib import Path

from fora_export.errors import BuildError, ForaError
from fora_runtime.manifest import MANIFEST_NAME, parse_manifest_bytes, read_manifest_bytes
from fora_runtime.trust import SIGNATURE_NAME

log = logging.getLogger(__name__)

#: The hidden siblings of ``--out``: a build in progress and a folder being replaced.
BUILDING, REPLACED = "building", "old"


def sibling(out: Path, kind: str, pid: int) -> Path:
    """The hidden sibling of ``out`` of ``kind`` (BUILDING or REPLACED) owned by process ``pid``."""
    return out.parent / f".{out.name}.{kind}-{pid}"


def building_folder(out: Path) -> Path:
    """An empty hidden sibling of ``out`` for this process to build in (not yet created)."""
    tmp = sibling(out, BUILDING, os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def check_destination(out: Path, force: bool) -> None:
    """Refuse an ``--out`` the build may not write: a file, a folder that is not empty
    (unless ``force`` and it is an engine folder), the current folder or one above it, or
    one whose parent cannot be created or written."""
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out '{out}' | is a file | choose a folder path")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise BuildError(f"--out '{out}' | already exists | pass --force to replace it")
        check_replaceable(out)
    if out.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise BuildError(f"--out '{out}' | is the current folder or one above it | choose a subfolder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BuildError(f"--out '{out}' | cannot create parent folder: {err}") from err
    if not os.access(out.parent, os.W_OK):
        raise BuildError(f"--out '{out}' | parent folder is not writable")


def check_replaceable(folder: Path, *, shown: Path | None = None) -> None:
    """Refuse to replace ``folder`` unless it is an engine folder: its manifest parses as one,
    and it holds nothing the manifest does not list (--force never deletes other files)."""
    shown = shown or folder
    fix = "choose another --out; --force only replaces engine folders"
    try:  # parsed only: no signature or file checks, the folder is about to be deleted
        manifest = parse_manifest_bytes(read_manifest_bytes(folder)[1], where=str(folder / MANIFEST_NAME))
    except ForaError as err:
        parts = str(err).split(" | ")
        reason = parts[min(1, len(parts) - 1)]
        raise BuildError(
            f"--out '{shown}' | is not empty and not an engine folder ({reason}) | {fix} "
            "(remove it yourself if it is one from an older fora-export)"
        ) from err
    known = {MANIFEST_NAME, SIGNATURE_NAME, *manifest.files}
    strangers = sorted(path.name for path in folder.iterdir() if path.name not in known)
    if strangers:
        raise BuildError(
            f"--out '{shown}' | holds files its manifest does not list ({', '.join(strangers[:3])}"
            f"{', ...' if len(strangers) > 3 else ''}) | move them out first, or {fix}"
        )


def clear_stale_builds(out: Path) -> None:
    """Remove the hidden folders that killed builds to ``out`` left behind; refuse to run next
    to a build of ``out`` that is still running. A previous folder left moved aside (a build
    killed between its two renames) is put back first."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.({BUILDING}|{REPLACED})-(\d+)")
    if not out.parent.is_dir():
        return
    for path in sorted(out.parent.iterdir()):
        match = pattern.fullmatch(path.name)
        if match is None or not path.is_dir():
            continue
        kind, pid = match.group(1), int(match.group(2))
        if pid != os.getpid() and _process_alive(pid):
            raise BuildError(
                f"--out '{out}' | another build (process {pid}) is writing it now ({path.name}) | wait "
                f"for it to finish; if no such build runs, remove {path}"
            )
        if kind == REPLACED and not out.exists():
            path.rename(out)
            log.warning("put back %s: a build killed while replacing it had moved it to %s", out, path)
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.warning("removed %s, left by a build (process %d) that did not finish", path, pid)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def move_into_place(tmp: Path, out: Path, *, replace: bool) -> None:
    """Move the finished build to ``out``: one ``rename``, which fails when another process
    created a non-empty ``out`` meanwhile. With ``replace`` an existing ``out`` is first moved
    aside, checked to still be an engine folder, and put back if anything fails."""
    old = sibling(out, REPLACED, os.getpid())
    moved_aside = False
    try:
        if replace and out.exists():
            out.rename(old)
            moved_aside = True
            check_replaceable(old, shown=out)  # what is there now, not what was there at the start
        os.rename(tmp, out)
    except (OSError, BuildError) as err:
        if moved_aside and not out.exists():
            old.rename(out)
        if isinstance(err, BuildError):
            raise
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise BuildError(
                f"--out '{out}' | was created by another process while this build ran (nothing of it was "
                "replaced; this build was discarded) | pass --force to replace it, or another --out"
            ) from err
        raise BuildError(f"--out '{out}' | cannot move the finished build into place: {err}") from err
    if moved_aside:
        shutil.rmtree(old, ignore_errors=True)


def check_free_space(out: Path, needed: int) -> None:
    """Refuse, before exporting, a build of at least ``needed`` bytes (the model's weights in
    every graph format built) that the disk holding ``out`` cannot take."""
    free = free_bytes(out.parent)
    if free is not None and needed > free:
        raise BuildError(
            f"--out '{out}' | the build needs at least {size_text(needed)} (the model's weights in every "
            f"graph format built), {size_text(free)} free there | free space, or pass --out on another disk"
        )


def discard_failed_build(tmp: Path, out: Path, err: BaseException, needed: int) -> BuildError | None:
    """Remove the failed build's folder ``tmp``; when ``err`` is (or wraps) running out of
    disk space, the one-line error saying so (None: re-raise ``err`` as it is)."""
    full = _disk_full(err)
    written = _folder_bytes(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    if full is None:
        return None
    file = Path(str(full.filename)) if full.filename else tmp
    shown = out / file.name if file.parent == tmp else file  # the hidden folder is gone now
    return BuildError(
        f"{shown} | no space left on the device ({full.strerror}) after writing "
        f"{size_text(written)} of the build; it needs at least {size_text(needed)} (the model's weights in "
        f"every graph format built), {size_text(free_bytes(out.parent))} free there | free space, or "
        "pass --out on another disk"
    )


def free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _folder_bytes(folder: Path) -> int:
    try:
        return sum(path.stat().st_size for path in folder.iterdir() if path.is_file())
    except OSError:
        return 0


def _disk_full(err: BaseException) -> OSError | None:
    """The out-of-space OSError behind ``err`` (exporters wrap the errors they meet)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return current
        current = current.__cause__ or current.__context__
    return None


def size_text(nbytes: int | None) -> str:
    """``nbytes`` in words: ``1.50 GiB``, ``12 B``, ``an unknown amount``."""
    if nbytes is None:
        return "an unknown amount"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"
