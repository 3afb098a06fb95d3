"""What opening an engine folder may do, and the two ways to allow more (docs/trust.md).

An engine folder is data written by whoever built or copied it. Opening it:

- **ONNX graphs** (``*.onnx``) are parsed by ONNX Runtime: no code from the folder runs.
  The external-data paths inside an ONNX file are ONNX Runtime's to contain (1.32 refuses
  paths leaving the model's folder; releases before that fix do not).
- **TensorRT plans** (``*.plan``) are code-free except for plugin layers (kernels from
  plugin libraries, looked up by name in the process's plugin registry) and embedded host
  code. From an untrusted folder the runtime deserialises plans with the plugin registry
  cut off from the global one and host code refused (:func:`restrict_tensorrt_runtime`):
  a plan with a plugin layer fails to load.
- **torch programs** (``*.pt2``) are code. ``torch.export.load`` unpickles (the sample
  inputs fall back to ``torch.load(weights_only=False)``, custom objects use plain
  pickle), resolves every graph node's target as an attribute path from the ``torch``
  module (``torch.os.system`` is one), and parses shape expressions with sympy, which
  evaluates them. No option of torch 2.13 makes it code-free, so programs are loaded only
  from a trusted folder.

A folder is trusted when the caller says so (``ForaSession(..., trust_programs=True)``,
``--trust`` on the CLI) or when its manifest carries a valid signature under the
deployer's key: an HMAC-SHA256 of ``manifest.json``'s bytes in ``manifest.json.hmac``,
written by ``fora-export build --sign-key FILE``. The key is given as
``manifest_key=``/``manifest_key_file=`` or in ``FORA_MANIFEST_KEY``; with a key, an
unsigned or wrongly signed folder is refused before any other file is read, and every
file is checked against its sha256 (the manifest then authenticates each file's bytes).

Stdlib only.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fora_runtime.errors import BackendError, ManifestError

SIGNATURE_NAME = "manifest.json.hmac"
KEY_ENV = "FORA_MANIFEST_KEY"
MIN_KEY_BYTES = 16
#: Domain separation: a signature of a manifest is never a valid MAC of anything else.
_SIGNED_PREFIX = b"fora-manifest-hmac-sha256-v1\0"
KEY_HELP = 'make one with: python -c "import secrets; print(secrets.token_hex(32))" > fora.key'


@dataclass(frozen=True)
class FolderAccess:
    """How engine folders are opened: file verification and trust, as one value that tools
    pass down (the CLI's ``--verify``, ``--trust`` and ``--key-file`` build it)."""

    #: ``stamp`` (size and stamp of each file), ``full`` (sha256 of each) or ``none``.
    verify: str = "stamp"
    #: Vouch for the folder: torch programs and TensorRT plugin layers may load.
    trust_programs: bool = False
    #: The deployer's key (else ``$FORA_MANIFEST_KEY``): the folder must be signed with it.
    manifest_key_file: str | Path | None = None

    def manifest_options(self) -> dict[str, Any]:
        """Keyword arguments of ``load_manifest``."""
        return {"verify": self.verify, "manifest_key_file": self.manifest_key_file}

    def session_options(self) -> dict[str, Any]:
        """Keyword arguments of ``ForaSession`` (and ``ForaTransformer.from_engine``)."""
        return {**self.manifest_options(), "trust_programs": self.trust_programs}


#: The default: stamps verified, nothing trusted, the key (if any) from the environment.
DEFAULT_ACCESS = FolderAccess()


def resolve_manifest_key(key: str | bytes | None = None, key_file: str | Path | None = None) -> bytes | None:
    """The deployer's manifest key: ``key``, else the content of ``key_file`` (a trailing
    newline dropped), else ``$FORA_MANIFEST_KEY``; None when none is set."""
    if key is not None and key_file is not None:
        raise ManifestError("Manifest key | given both as a value and as a file | pass one of them")
    source = "manifest_key"
    if key_file is not None:
        source = f"key file '{key_file}'"
        try:
            key = Path(key_file).read_bytes().rstrip(b"\r\n")
        except OSError as err:
            raise ManifestError(
                f"Manifest key file '{key_file}' | cannot be read ({err.strerror or err}) | pass the file "
                "the engines were signed with"
            ) from err
    elif key is None and os.environ.get(KEY_ENV):
        source, key = f"${KEY_ENV}", os.environ[KEY_ENV]
    if key is None:
        return None
    raw = key.encode() if isinstance(key, str) else bytes(key)
    if len(raw) < MIN_KEY_BYTES:
        raise ManifestError(
            f"Manifest key ({source}) | {len(raw)} bytes, too short to sign with | use at least "
            f"{MIN_KEY_BYTES} random bytes; {KEY_HELP}"
        )
    return raw


def manifest_signature(manifest_bytes: bytes, key: bytes) -> str:
    """The hex HMAC-SHA256 of a manifest's bytes under ``key``."""
    return hmac.new(key, _SIGNED_PREFIX + manifest_bytes, hashlib.sha256).hexdigest()


def sign_folder(folder: Path, key: bytes, manifest_name: str = "manifest.json") -> Path:
    """Write ``folder/manifest.json.hmac`` for the manifest as it is on disk now."""
    path = Path(folder) / SIGNATURE_NAME
    path.write_text(manifest_signature((Path(folder) / manifest_name).read_bytes(), key) + "\n")
    return path


def verify_manifest_signature(folder: Path, manifest_bytes: bytes, key: bytes) -> None:
    """Raise ManifestError unless ``folder``'s signature file holds the HMAC of
    ``manifest_bytes`` under ``key`` (compared in constant time)."""
    path = Path(folder) / SIGNATURE_NAME
    try:
        if path.is_symlink() or not path.is_file():
            raise FileNotFoundError(path)
        recorded = path.read_bytes()[:256].strip().decode("ascii", "replace")
    except OSError as err:
        raise ManifestError(
            f"{path} | missing: the folder is not signed, and a manifest key is set ({KEY_ENV} or "
            "--key-file) | sign it with `fora-export build --sign-key FILE`, or unset the key to open "
            "unsigned folders"
        ) from err
    if not hmac.compare_digest(recorded, manifest_signature(manifest_bytes, key)):
        raise ManifestError(
            f"{path} | does not match manifest.json under this key: the manifest was changed after "
            "signing, or signed with another key | rebuild and sign the engines, or pass the key they "
            "were signed with"
        )


def untrusted_program_error(path: Path) -> BackendError:
    """The error for a torch program in a folder nobody vouched for."""
    return BackendError(
        f"{path} | not loaded: torch programs run code when loaded (torch.export.load unpickles), "
        "and this engine folder is not trusted | for folders you built or vouch for pass "
        "trust_programs=True (CLI: --trust), or sign the folder (`fora-export build --sign-key FILE`) "
        f"and set {KEY_ENV}; the onnxruntime backend needs no trust"
    )


def restrict_tensorrt_runtime(runtime: Any, *, trusted: bool) -> None:
    """For an untrusted folder: no plugin from the process's global registry (a plan's plugin
    layers then fail to deserialise) and no embedded host code. Both are documented
    ``tensorrt.Runtime`` settings (``get_plugin_registry().parent_search_enabled``,
    ``engine_host_code_allowed``) of TensorRT 10 and TensorRT-RTX."""
    if trusted:
        return
    runtime.engine_host_code_allowed = False
    runtime.get_plugin_registry().parent_search_enabled = False


def untrusted_plan_error(path: Path, title: str) -> BackendError:
    """Why a plan from an untrusted folder did not deserialise."""
    return BackendError(
        f"{path} | {title} cannot deserialize it with plugins and host code refused (this engine "
        "folder is not trusted; see the TensorRT error above) | if the plan needs plugin layers and "
        "you vouch for the folder, pass trust_programs=True (CLI: --trust) or sign it; else rebuild "
        f"the engines with this {title} on this GPU"
    )
