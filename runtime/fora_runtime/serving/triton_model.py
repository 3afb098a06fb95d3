"""Triton Python-backend model: one FORA generation per request, batched across requests.

``fora-export triton`` copies this file as ``REPOSITORY/NAME/1/model.py``; it lives in
the runtime's serving package because it runs on ``fora_runtime`` alone. It runs
inside Triton's Python stub and imports only the standard library, numpy,
``triton_python_backend_utils`` and ``fora_runtime`` (plus diffusers, only when
the repository's scheduler config is not DDIM). Each model instance loads the
engine folder ``1/engine`` once into a ``ForaSession``; ``execute`` receives the
requests Triton's dynamic batcher collected, checks each one alone (a bad one
gets an error response with the runtime's one-line message), runs requests with
the same step count, schedule and guidance as one batched generation, and
answers each with its own final latents.

Settings come from ``config.pbtxt``'s parameters: ``fora_engine``,
``fora_backend``, ``fora_scheduler``, ``fora_threads`` and ``fora_python_path``
(folders added as site directories before fora_runtime is imported, for a stub
interpreter that does not see the environment fora-runtime is installed in).
"""

from __future__ import annotations

import json
import site
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

#: Where the stub loaded this file from: REPOSITORY/NAME/1/.
VERSION_DIR = Path(__file__).resolve().parent


def _add_site_dirs(paths: list[str]) -> None:
    """Put ``paths`` first on sys.path, processing their .pth files (editable installs)."""
    before = list(sys.path)
    for path in paths:
        site.addsitedir(path)
    added = [p for p in sys.path if p not in before]
    sys.path[:] = added + before


class DiffusersSampler:
    """A diffusers scheduler (any class) as a sampler; imports diffusers and torch, so
    it is used only for pipeline scheduler configs that are not DDIM."""

    def __init__(self, config: dict[str, Any]) -> None:
        import diffusers
        import torch

        self._torch = torch
        self._scheduler = getattr(diffusers, config["_class_name"]).from_config(config)

    def timesteps(self, num_steps: int) -> np.ndarray:
        self._scheduler.set_timesteps(num_steps)
        return np.asarray(self._scheduler.timesteps.numpy())

    def initial(self, latents: np.ndarray) -> np.ndarray:
        return (latents * np.float32(self._scheduler.init_noise_sigma)).astype(np.float32)

    def model_input(self, latents: np.ndarray, timestep: Any) -> np.ndarray:
        scaled = self._scheduler.scale_model_input(self._torch.from_numpy(latents), timestep)
        return np.asarray(scaled.numpy())

    def step(self, noise: np.ndarray, timestep: Any, latents: np.ndarray) -> np.ndarray:
        out = self._scheduler.step(self._torch.from_numpy(noise), timestep, self._torch.from_numpy(latents))
        return np.asarray(out.prev_sample.numpy(), dtype=np.float32)


class TritonPythonModel:
    """The model class Triton's Python backend instantiates, once per instance."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        _add_site_dirs(json.loads(params.get("fora_python_path", "[]")))
        try:
            from fora_runtime import ForaSession
            from fora_runtime.errors import ForaError
            from fora_runtime.serving import (
                BatchedGenerator,
                DDIMSampler,
                ServingSpec,
                instance_backend_options,
                parse_request,
            )
        except ImportError as err:
            raise RuntimeError(
                f"fora_runtime | not importable by Triton's Python stub ({sys.executable}: {err}) | start "
                "tritonserver with the environment's bin/ first on PATH (tools/serve_triton.py does), or "
                "regenerate with --python-path SITE_PACKAGES"
            ) from err
        self._fora_error: type[Exception] = ForaError
        self._parse = parse_request
        kind = args.get("model_instance_kind", "CPU").lower()
        device = int(args.get("model_instance_device_id", "0"))
        backend = params["fora_backend"]
        options = instance_backend_options(
            backend, kind, device, threads=int(params.get("fora_threads", "0"))
        )
        trusted = params.get("fora_trust_programs") == "true"  # fora-export triton --trust
        self._session = ForaSession(
            VERSION_DIR / params["fora_engine"], backend=backend, trust_programs=trusted, **options
        )
        self._session.activate()
        self._spec = ServingSpec.from_manifest(
            self._session.manifest, max_batch=int(config["max_batch_size"])
        )
        scheduler = json.loads((VERSION_DIR / params["fora_scheduler"]).read_text())
        sampler_class = DDIMSampler if scheduler.get("_class_name") == "DDIMScheduler" else DiffusersSampler
        sampler_class(scheduler)  # a bad config fails the load, not the first request; imports now
        self._generator = BatchedGenerator(self._session, self._spec, lambda: sampler_class(scheduler))
        self._input_names = [t.name for t in self._spec.inputs()]
        self._output_name = self._spec.outputs()[0].name
        pb_utils.Logger.log_info(
            f"fora: {args.get('model_name')} instance {args.get('model_instance_name')} loaded "
            f"{VERSION_DIR / params['fora_engine']} ({backend}, {kind} {device}, "
            f"{scheduler.get('_class_name')})"
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        parsed: list[Any] = []
        errors: list[str | None] = []
        for request in requests:
            inputs = {}
            for name in self._input_names:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    inputs[name] = tensor.as_numpy()
            try:
                parsed.append(self._parse(inputs, self._spec))
                errors.append(None)
            except self._fora_error as err:
                parsed.append(None)
                errors.append(str(err))
        results = self._generator.run(parsed)
        responses = []
        for error, result in zip(errors, results, strict=True):
            if isinstance(result, Exception):
                if not isinstance(result, self._fora_error):  # a bug: keep its traceback in the log
                    trace = "".join(traceback.format_exception(result))
                    pb_utils.Logger.log_error(f"fora: generation failed\n{trace}")
                error = str(result) if isinstance(result, self._fora_error) else f"internal error: {result!r}"
            if error is not None:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(error)))
            else:
                output = pb_utils.Tensor(self._output_name, result)
                responses.append(pb_utils.InferenceResponse(output_tensors=[output]))
        return responses

    def finalize(self) -> None:
        self._session.deactivate()
