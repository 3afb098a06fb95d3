"""Start ``tritonserver`` from the ``nvidia-pytriton`` wheel on a model repository.

The wheel bundles ``tritonserver`` (2.51), its libraries (``nvidia_pytriton.libs``)
and the Python backend, with one ``triton_python_backend_stub`` per Python
version. Triton wants the stub next to ``libtriton_python.so`` in a backend
directory, so :func:`make_backend_dir` builds one (links, site-packages stays
untouched). The stub embeds the Python it was built for; with this environment's
``bin/`` first on ``PATH`` it runs as this environment's interpreter (as PyTriton
starts it), so numpy (which the backend's own utilities import before any model
code) and fora_runtime import there.

Used by ``tools/serve_triton.py``, ``tools/load_test.py`` and the tests. Binds to
127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fora_export.errors import ConfigError

LOCALHOST = "127.0.0.1"


@dataclass(frozen=True)
class TritonInstall:
    """The parts of the nvidia-pytriton wheel a server needs."""

    server: Path
    libs: Path
    backend_lib: Path
    backend_utils: Path
    stub: Path


def find_triton() -> TritonInstall:
    """Locate the wheel's server and the Python stub for this interpreter's version."""
    spec = importlib.util.find_spec("pytriton")  # located, not imported
    if spec is None or spec.origin is None:
        raise ConfigError(
            "tritonserver | the nvidia-pytriton wheel is not installed | pip install nvidia-pytriton "
            "(it bundles tritonserver and its Python backend)"
        )
    root = Path(spec.origin).parent / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(
        server=root / "bin" / "tritonserver",
        libs=root.parent.parent / "nvidia_pytriton.libs",
        backend_lib=root / "backends" / "python" / "libtriton_python.so",
        backend_utils=root / "backends" / "python" / "triton_python_backend_utils.py",
        stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
    )
    for path in (install.server, install.libs, install.backend_lib, install.backend_utils, install.stub):
        if not path.exists():
            raise ConfigError(
                f"tritonserver | {path} is missing from the nvidia-pytriton wheel | reinstall it "
                f"(a stub is needed for Python {version})"
            )
    return install


def make_backend_dir(folder: Path, install: TritonInstall) -> Path:
    """``folder/python/`` with the backend library, its utilities and the stub side by side."""
    python = folder / "python"
    python.mkdir(parents=True, exist_ok=True)
    for source in (install.backend_lib, install.backend_utils, install.stub):
        link = python / source.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
    return folder


def environment_prefixes(install: TritonInstall) -> dict[str, list[str]]:
    """Folders the server needs in front of ``LD_LIBRARY_PATH`` and ``PATH``: the wheel's
    libraries, and this environment's interpreter (the stub then runs inside it).

    The stub links ``libpython3.X.so.1.0`` by name; with this interpreter's own shared
    libpython first on LD_LIBRARY_PATH the stub embeds exactly this Python, whose
    standard-library extension modules it then loads (another build of 3.X, e.g. the
    distribution's, fails on some of them: ``_ssl``: undefined symbol)."""
    libs = [str(install.libs)]
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    shared = sysconfig.get_config_var("Py_ENABLE_SHARED")
    if shared and libdir and soname and (Path(libdir) / soname).exists():
        libs.insert(0, libdir)
    return {"LD_LIBRARY_PATH": libs, "PATH": [str(Path(sys.executable).parent)]}


def server_environment(install: TritonInstall, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with :func:`environment_prefixes`."""
    env = dict(os.environ if base is None else base)
    for name, prefixes in environment_prefixes(install).items():
        env[name] = os.pathsep.join(p for p in (*prefixes, env.get(name)) if p)
    return env


def server_command(
    install: TritonInstall,
    repository: Path,
    backend_dir: Path,
    *,
    http_port: int,
    grpc_port: int,
    metrics_port: int | None = None,
    address: str = LOCALHOST,
    exit_timeout_s: int | None = None,
) -> list[str]:
    """The tritonserver command line; metrics off unless ``metrics_port`` is given.
    ``exit_timeout_s``: how long a stopping server waits for open connections (Triton: 30)."""
    command = [
        str(install.server),
        f"--model-repository={repository}",
        f"--backend-directory={backend_dir}",
        f"--http-address={address}",
        f"--http-port={http_port}",
        f"--grpc-address={address}",
        f"--grpc-port={grpc_port}",
        "--exit-on-error=true",
    ]
    if exit_timeout_s is not None:
        command.append(f"--exit-timeout-secs={exit_timeout_s}")
    if metrics_port is None:
        command.append("--allow-metrics=false")
    else:
        command += [
            f"--metrics-address={address}",
            f"--metrics-port={metrics_port}",
            "--allow-gpu-metrics=false",
        ]
    return command


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


class TritonServer:
    """A tritonserver process on 127.0.0.1 with free ports, for tests and benchmarks.

    with TritonServer(repository, workdir) as server:
        client = tritonclient.http.InferenceServerClient(server.http_url)
    """

    def __init__(self, repository: Path, workdir: Path, *, metrics: bool = False) -> None:
        self.repository = Path(repository)
        self.workdir = Path(workdir)
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.metrics_port = free_port() if metrics else None
        self.log_path = self.workdir / "tritonserver.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"{LOCALHOST}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{LOCALHOST}:{self.grpc_port}"

    @property
    def pid(self) -> int:
        assert self.process is not None, "server not started"
        return self.process.pid

    def start(self, timeout: float = 120.0) -> TritonServer:
        install = find_triton()
        backend_dir = make_backend_dir(self.workdir / "backends", install)
        command = server_command(
            install,
            self.repository,
            backend_dir,
            http_port=self.http_port,
            grpc_port=self.grpc_port,
            metrics_port=self.metrics_port,
            exit_timeout_s=5,  # clients' keep-alive connections must not hold a test's teardown
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, env=server_environment(install), stdout=log, stderr=subprocess.STDOUT
            )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited ({self.process.returncode}):\n{self.log_tail()}")
            with (
                contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError),
                urllib.request.urlopen(url, timeout=1.0) as response,
            ):
                if response.status == 200:
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"tritonserver not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def rss_bytes(self) -> int:
        """Resident memory of the server and its Python stubs (one per model instance)."""
        return sum(_rss_bytes(pid) for pid in (self.pid, *_children(self.pid)))

    def stop(self, timeout: float = 30.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found += [int(child) for child in task.read_text().split()]
    return found


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0
