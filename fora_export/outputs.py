"""Files the commands write besides engine folders (JSON reports, plots, image folders):
checked before any work starts, written whole or not at all.

A report lands under its name only once complete (written to a hidden sibling, then
renamed), so an interrupted or failed write never leaves half a file; a full disk is a
one-line error naming the file and the bytes it needed.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fora_export.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".svg", ".pdf", ".jpg", ".jpeg")
#: errno values that mean "the disk (or the quota) is full".
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def check_output_file(path: Path | None, option: str, *, image: bool = False) -> None:
    """Refuse, before any work, an output file that cannot be written."""
    if path is None:
        return
    if path.is_dir():
        raise ConfigError(f"{option} '{path}' | is a folder | pass a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"{option} '{path}' | folder {parent} does not exist | create it first")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{option} '{path}' | folder {parent} is not writable | choose another")
    if image and path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ConfigError(
            f"{option} '{path}' | unknown image type {path.suffix or '(none)'!r} "
            f"| end it in one of {', '.join(IMAGE_SUFFIXES)}"
        )
    if image:
        require_matplotlib(option)


def require_matplotlib(option: str) -> None:
    """Refuse, before any work, an option that draws a plot when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            f"{option} | matplotlib is not installed | pip install 'fora-export[quality]'"
        ) from err


def check_output_folder(path: Path | None, option: str) -> None:
    """Refuse, before any work, an output folder that cannot be created or written: it must be
    a writable folder, or not exist below a writable one."""
    if path is None:
        return
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{option} '{path}' | is a file | pass a folder")
        if not os.access(path, os.W_OK):
            raise ConfigError(f"{option} '{path}' | is not writable | choose another folder")
        return
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        raise ConfigError(f"{option} '{path}' | cannot be created: {ancestor} is not a writable folder")


def disk_full_error(path: Path | str, needed: int | None, err: OSError) -> ConfigError:
    """The one-line error for a write that ran out of space."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    try:
        free = f"{_size(os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize)} free"
    except OSError:
        free = "free space unknown"
    need = f"it needed {_size(needed)}" if needed is not None else "it needed more"
    return ConfigError(
        f"{target} | no space left on the device ({err.strerror or err}): {need}, {free} there "
        "| free some space or write somewhere else"
    )


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


@contextmanager
def atomic_path(path: Path, option: str, needed: int | None = None) -> Iterator[Path]:
    """A hidden sibling of ``path`` to write; renamed to ``path`` when the block completes,
    removed when it fails (any exception, KeyboardInterrupt and SIGTERM included)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno in NO_SPACE:
            raise disk_full_error(path, needed, err) from err
        raise ConfigError(f"{option} '{path}' | cannot write it ({err.strerror or err})") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str, option: str) -> Path:
    """Write ``text`` to ``path`` whole or not at all."""
    data = text.encode()
    with atomic_path(path, option, needed=len(data)) as tmp:
        tmp.write_bytes(data)
    return path


def save_figure(figure: Any, path: Path, option: str, **savefig: Any) -> Path:
    """``figure.savefig`` whole or not at all (the format follows ``path``'s suffix)."""
    save: Callable[..., Any] = figure.savefig
    with atomic_path(path, option) as tmp:
        save(tmp, format=path.suffix.lstrip(".").lower() or None, **savefig)
    return path
