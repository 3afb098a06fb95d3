"""Start tritonserver (from the nvidia-pytriton wheel) on a model repository.

    python tools/serve_triton.py MODEL_REPOSITORY [--http-port 8000] [--grpc-port 8001]
        [--metrics-port 8002] [--address 127.0.0.1] [--backend-dir DIR] [--print-command]

Builds the Python backend folder Triton needs (the wheel's libtriton_python.so and
the stub for this Python, side by side; default: a temporary folder), puts the
wheel's libraries on LD_LIBRARY_PATH and this environment's bin/ first on PATH
(the stub then runs this environment's Python, where fora_runtime is installed)
and runs the server in the foreground until Ctrl-C. Binds to 127.0.0.1 unless
--address says otherwise. --print-command prints the environment and command
line instead of running it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from pathlib import Path

from fora_export.serving.triton_server import (
    LOCALHOST,
    environment_prefixes,
    find_triton,
    make_backend_dir,
    server_command,
    server_environment,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repository", type=Path)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002, help="0 switches metrics off")
    parser.add_argument("--address", default=LOCALHOST, help="address to bind HTTP, gRPC and metrics to")
    parser.add_argument("--backend-dir", type=Path, default=None, help="[default: a temporary folder]")
    parser.add_argument(
        "--print-command", action="store_true", help="print the command instead of running it"
    )
    args = parser.parse_args()
    if not args.repository.is_dir():
        sys.exit(
            f"error: {args.repository} | not a folder | write one with `fora-export triton ENGINE --out DIR`"
        )
    install = find_triton()
    backend_dir = args.backend_dir or Path(tempfile.mkdtemp(prefix="fora-triton-backends-"))
    make_backend_dir(backend_dir, install)
    command = server_command(
        install,
        args.repository.resolve(),
        backend_dir.resolve(),
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port or None,
        address=args.address,
    )
    if args.print_command:
        for name, prefixes in environment_prefixes(install).items():
            print(f"{name}={shlex.quote(os.pathsep.join(prefixes))}:${name} \\")
        print("  " + " \\\n    ".join(shlex.quote(part) for part in command))
        return
    env = server_environment(install)
    print(
        f"serving {args.repository}: http {args.address}:{args.http_port}, "
        f"grpc {args.address}:{args.grpc_port}"
    )
    sys.stdout.flush()
    os.execve(command[0], command, env)


if __name__ == "__main__":
    main()
