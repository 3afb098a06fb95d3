"""Backend options for one server model instance (a CPU process or one GPU)."""

from __future__ import annotations

from typing import Any

from fora_runtime.errors import BackendError

INSTANCE_KINDS = ("cpu", "gpu")


def instance_backend_options(backend: str, kind: str, device_id: int, threads: int = 0) -> dict[str, Any]:
    """``ForaSession`` backend options that pin an instance to its device: GPU instances
    run on ``device_id`` (one GPU per instance), CPU instances on the CPU. ``threads``
    caps ONNX Runtime's intra-op threads (0 = its default), so several CPU instances
    do not each claim every core."""
    if kind not in INSTANCE_KINDS:
        raise BackendError(f"Instance kind | got {kind!r} | expected one of {', '.join(INSTANCE_KINDS)}")
    gpu = kind == "gpu"
    if backend == "onnxruntime":
        # The runtime's ONNX Runtime backend takes provider names only: on a GPU it uses the
        # process's first visible device (pin it with CUDA_VISIBLE_DEVICES).
        providers: Any = "auto" if gpu else ["CPUExecutionProvider"]
        return {"providers": providers, "intra_op_threads": threads}
    if backend == "torch":
        return {"device": f"cuda:{device_id}" if gpu else "cpu"}
    if backend == "tensorrt":
        if not gpu:
            raise BackendError("Backend 'tensorrt' | needs a GPU instance | use --kind gpu")
        return {"device": device_id}
    raise BackendError(f"Backend '{backend}' | unknown | expected onnxruntime, torch or tensorrt")
