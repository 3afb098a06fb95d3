"""Load-test a served engine folder on Triton, with and without dynamic batching.

    python tools/load_test.py ENGINE_DIR [--clients 8] [--requests 64] [--rounds 2] [--steps 10]
        [--max-seconds 120] [--protocol http|grpc] [--json FILE]

Writes one repository with two models of ENGINE_DIR (``batched``: dynamic batching
on; ``unbatched``: off, so every request is its own generation), starts
tritonserver on 127.0.0.1 (free ports) and, per model, has C concurrent clients
send batch-1 requests (each its own seed and class label) until --requests are
answered or --max-seconds pass. The two models take turns for --rounds rounds
(on a shared machine, load from elsewhere then hits both alike). Prints
throughput, p50/p99 latency and the mean requests per execute() (Triton's
statistics) per model over all rounds, and the throughput ratio. Bounded in
requests and time; traffic stays on localhost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from click.testing import CliRunner

from fora_export.cli import main as fora_export
from fora_export.serving.triton_server import TritonServer
from fora_runtime import load_manifest


@dataclass
class ModelResult:
    model: str
    requests: int
    errors: int
    seconds: float
    throughput_rps: float
    p50_ms: float
    p99_ms: float
    requests_per_execute: float


def _client(protocol: str, server: TritonServer) -> tuple[Any, Any]:
    if protocol == "grpc":
        import tritonclient.grpc as module

        return module, module.InferenceServerClient(server.grpc_url)
    import tritonclient.http as module

    return module, module.InferenceServerClient(server.http_url, concurrency=1)


def _request(module: Any, index: int, steps: int, num_classes: int) -> list[Any]:
    arrays = {
        "seed": np.array([[index]], dtype=np.int64),
        "class_labels": np.array([[index % num_classes]], dtype=np.int64),
        "num_steps": np.array([[steps]], dtype=np.int32),
    }
    types = {"int64": "INT64", "int32": "INT32"}
    inputs = []
    for name, array in arrays.items():
        tensor = module.InferInput(name, list(array.shape), types[array.dtype.name])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _stats(server: TritonServer, model: str) -> tuple[int, int]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url)
    stats = client.get_inference_statistics(model)["model_stats"][0]
    client.close()
    return int(stats["inference_count"]), int(stats["execution_count"])


@dataclass
class Phase:
    latencies: list[float]
    errors: int
    seconds: float
    requests: int
    executions: int


def warm_up(server: TritonServer, model: str, args: argparse.Namespace, num_classes: int) -> None:
    """Two requests per client, so the batch sizes the load produces exist before timing."""
    deadline = time.monotonic() + args.max_seconds
    _drive(server, model, args, num_classes, total=2 * args.clients, deadline=deadline)


def run_phase(server: TritonServer, model: str, args: argparse.Namespace, num_classes: int) -> Phase:
    count_before, executions_before = _stats(server, model)
    start = time.perf_counter()
    latencies, errors = _drive(
        server, model, args, num_classes, total=args.requests, deadline=time.monotonic() + args.max_seconds
    )
    seconds = time.perf_counter() - start
    count_after, executions_after = _stats(server, model)
    return Phase(latencies, errors, seconds, count_after - count_before, executions_after - executions_before)


def summarize(model: str, phases: list[Phase]) -> ModelResult:
    latencies = [x for p in phases for x in p.latencies]
    seconds = sum(p.seconds for p in phases)
    done = len(latencies)
    return ModelResult(
        model=model,
        requests=done,
        errors=sum(p.errors for p in phases),
        seconds=round(seconds, 3),
        throughput_rps=round(done / seconds, 3),
        p50_ms=round(float(np.percentile(latencies, 50)) * 1e3, 1) if done else float("nan"),
        p99_ms=round(float(np.percentile(latencies, 99)) * 1e3, 1) if done else float("nan"),
        requests_per_execute=round(
            sum(p.requests for p in phases) / max(1, sum(p.executions for p in phases)), 2
        ),
    )


def _drive(
    server: TritonServer, model: str, args: argparse.Namespace, num_classes: int, total: int, deadline: float
) -> tuple[list[float], int]:
    """C clients send requests until ``total`` were sent or the deadline passed."""
    lock = threading.Lock()
    next_index = [0]
    latencies: list[float] = []
    errors = [0]

    def client_loop() -> None:
        module, client = _client(args.protocol, server)
        try:
            while time.monotonic() < deadline:
                with lock:
                    index = next_index[0]
                    if index >= total:
                        return
                    next_index[0] += 1
                inputs = _request(module, index, args.steps, num_classes)
                sent = time.perf_counter()
                try:
                    client.infer(model, inputs)
                except Exception:  # counted, not fatal: the load test reports them
                    with lock:
                        errors[0] += 1
                    continue
                with lock:
                    latencies.append(time.perf_counter() - sent)
        finally:
            client.close()

    with ThreadPoolExecutor(args.clients) as pool:
        for future in [pool.submit(client_loop) for _ in range(args.clients)]:
            future.result()
    return latencies, errors[0]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()}"
    except OSError:
        pass
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine_dir", type=Path)
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=64, help="timed requests per model and round")
    parser.add_argument("--rounds", type=int, default=2, help="turns each model takes")
    parser.add_argument("--steps", type=int, default=10, help="steps per generation")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="time limit per model phase")
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    manifest = load_manifest(args.engine_dir)
    num_classes = int(manifest.conditioning.num_classes or 1)
    with tempfile.TemporaryDirectory(prefix="fora-load-test-") as tmp:
        repository = Path(tmp) / "models"
        for name, batching in (("batched", "--dynamic-batching"), ("unbatched", "--no-dynamic-batching")):
            result = CliRunner().invoke(
                fora_export,
                [
                    "-q",
                    "triton",
                    str(args.engine_dir),
                    "--out",
                    str(repository),
                    "--name",
                    name,
                    batching,
                    "--max-queue-delay-us",
                    str(args.max_queue_delay_us),
                ],
            )
            if result.exit_code != 0:
                raise SystemExit(result.output)
        with TritonServer(repository, Path(tmp) / "server") as server:
            models = ("batched", "unbatched")
            for name in models:
                warm_up(server, name, args, num_classes)
            phases: dict[str, list[Phase]] = {name: [] for name in models}
            for _ in range(args.rounds):
                for name in models:
                    phases[name].append(run_phase(server, name, args, num_classes))
            results = [summarize(name, phases[name]) for name in models]
            rss_mib = server.rss_bytes() / 2**20
    batched, unbatched = results
    ratio = batched.throughput_rps / unbatched.throughput_rps if unbatched.throughput_rps else float("nan")
    print(
        f"{args.engine_dir} ({manifest.model_class}, batch {manifest.batch}), {args.steps} steps, "
        f"{args.clients} clients, batch-1 requests over {args.protocol}, {args.rounds} rounds, {_cpu_name()}"
    )
    print("| model | requests | errors | throughput (req/s) | p50 (ms) | p99 (ms) | requests per execute |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r.model} | {r.requests} | {r.errors} | {r.throughput_rps:.2f} | {r.p50_ms:.0f} | "
            f"{r.p99_ms:.0f} | {r.requests_per_execute:.2f} |"
        )
    print(f"dynamic batching: {ratio:.2f}x the throughput without; server + stubs RSS {rss_mib:.0f} MiB")
    if args.json is not None:
        report = {
            "engine_dir": str(args.engine_dir),
            "steps": args.steps,
            "clients": args.clients,
            "rounds": args.rounds,
            "machine": _cpu_name(),
            "protocol": args.protocol,
            "results": [asdict(r) for r in results],
            "throughput_ratio": round(ratio, 3),
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
