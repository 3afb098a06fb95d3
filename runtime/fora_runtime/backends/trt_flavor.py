"""The two TensorRT flavours: datacenter TensorRT and TensorRT for RTX.

Every difference between them that the runtime (``backends/trt.py``) and the engine
builder (``fora_export/builder/tensorrt.py``) meet lives here; the code that uses
TensorRT is the same for both. Both modules expose the same Python API for what
we do (``Builder``, ``OnnxParser``, ``Runtime``, named tensors, ``IRuntimeConfig``
with ``USER_MANAGED`` contexts, ``execute_async_v3``). They differ in:

- the module: ``tensorrt`` (10.1+ / 11.x) or ``tensorrt_rtx_bindings`` (TensorRT-RTX
  1.x, whose libraries come from the ``tensorrt_rtx_libs`` package it imports), and
  so the install advice and the version numbering;
- where an engine may run: a datacenter engine on the compute capability of the GPU
  that built it; a TensorRT-RTX plan is built without a GPU for a list of target
  compute capabilities (RTX GPUs: 7.5, 8.6, 8.9, 12.0; not 9.0 / 10.0 datacenter
  GPUs) and finishes compiling on the device when first run;
- TensorRT-RTX checks a plan's header against the running GPU and library
  (``Runtime.get_engine_validity``) before deserializing it; its contexts compile
  shape-specialized kernels eagerly (``DynamicShapesKernelSpecializationStrategy.EAGER``)
  so the enqueue before a CUDA graph capture, not a later replay, does that work.

The manifest's ``backends["tensorrt"]`` record names its flavour in ``"flavor"``
(absent: datacenter TensorRT, as records written before TensorRT-RTX had none).
Nothing here imports a TensorRT module at import time.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, cast

from fora_runtime._lazy import import_optional
from fora_runtime.errors import BackendError
from fora_runtime.manifest import GATE_TABLE_ROLES, GRAPH_ROLES

if TYPE_CHECKING:
    import tensorrt

TENSORRT_INSTALL = "pip install tensorrt"
RTX_VERSION = "1.7.1.116"  # the TensorRT-RTX release these modules were written and tested against
RTX_INSTALL = f"pip install tensorrt-rtx-cu12-libs=={RTX_VERSION} tensorrt-rtx-cu12-bindings=={RTX_VERSION}"
# device_memory_size_v2 and the two-argument set_device_memory (setDeviceMemoryV2) exist from 10.1.
MIN_TENSORRT_VERSION = (10, 1)


class TrtModule(Protocol):
    """What the backend and the builder use of a TensorRT module.

    Typed by the datacenter ``tensorrt`` stubs: ``tensorrt_rtx_bindings`` has no
    stubs, and for these names its API is the same (checked by introspecting 1.7).
    """

    __version__: str
    ILogger: type[tensorrt.ILogger]
    Logger: type[tensorrt.Logger]
    Builder: type[tensorrt.Builder]
    OnnxParser: type[tensorrt.OnnxParser]
    Runtime: type[tensorrt.Runtime]
    Dims: type[tensorrt.Dims]
    DataType: type[tensorrt.DataType]
    LayerType: type[tensorrt.LayerType]
    BuilderFlag: type[tensorrt.BuilderFlag]
    MemoryPoolType: type[tensorrt.MemoryPoolType]
    NetworkDefinitionCreationFlag: type[tensorrt.NetworkDefinitionCreationFlag]
    TensorIOMode: type[tensorrt.TensorIOMode]
    TensorLocation: type[tensorrt.TensorLocation]
    ExecutionContextAllocationStrategy: type[tensorrt.ExecutionContextAllocationStrategy]


class _ValidityRuntime(Protocol):
    """TensorRT-RTX's ``Runtime.get_engine_validity`` (not in the datacenter API)."""

    def get_engine_validity(self, buffer: bytes) -> tuple[Any, int]: ...


def tensorrt_version_tuple(version: str) -> tuple[int, int] | None:
    """(major, minor) of a TensorRT version string ("10.13.0.35" -> (10, 13)); None if unreadable."""
    match = re.match(r"\s*(\d+)(?:\.(\d+))?", version)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2) or 0)


def compute_capability_key(capability: str) -> tuple[int, ...]:
    """A sort key for "major.minor" strings ("12.0" after "8.9")."""
    return tuple(int(part) for part in capability.split(".") if part.isdigit())


class TrtFlavor:
    """One TensorRT flavour: its module, versions and where its engines run."""

    #: The record's ``flavor`` value.
    name: ClassVar[str]
    #: How messages name it.
    title: ClassVar[str]
    module_name: ClassVar[str]
    install: ClassVar[str]
    min_version: ClassVar[tuple[int, int]]
    #: Record key holding the version of the library that built the engines.
    version_key: ClassVar[str]
    #: Why ``min_version`` (said when an older one is refused).
    min_version_reason: ClassVar[str]

    # -- the module -------------------------------------------------------------------
    def too_old(self, version: str) -> str | None:
        """Why ``version`` cannot be used (the problem part of an error), or None."""
        parsed = tensorrt_version_tuple(version)
        needed = ".".join(str(part) for part in self.min_version)
        if parsed is None:
            return (
                f"cannot read the {self.title} version {version!r} ({self.title} {needed} or newer is needed)"
            )
        if parsed < self.min_version:
            return (
                f"{self.title} {version} is too old: {self.title} {needed} or newer is needed "
                f"({self.min_version_reason})"
            )
        return None

    def unusable(self, module: Any, entry_point: str, after_upgrade: str) -> str | None:
        """Why an imported module cannot be used ("problem | fix" of an error), or None.

        ``entry_point`` is the class the caller needs (``Builder``, ``Runtime``): a bare
        ``tensorrt/`` folder (e.g. from tensorrt-stubs) imports as an empty namespace package.
        ``after_upgrade`` ends the upgrade advice for a too old version.
        """
        version = getattr(module, "__version__", None)
        if not isinstance(version, str) or not hasattr(module, entry_point):
            return (
                f"'{self.module_name}' imports but has no runtime library (only type stubs are installed) "
                f"| install the real package: {self.install}"
            )
        problem = self.too_old(version)
        if problem is not None:
            return f"{problem} | {self.upgrade_advice()}{after_upgrade}"
        return None

    def upgrade_advice(self) -> str:
        needed = ".".join(str(part) for part in self.min_version)
        return f"upgrade: pip install '{self.module_name}>={needed}'"

    def load(self, *, backend: str) -> tuple[TrtModule, str]:
        """Import the module (lazily) and return it with its version; refuse a stub-only or
        too old install (BackendError naming ``backend``)."""
        module = import_optional(self.module_name, backend=backend, install=self.install)
        problem = self.unusable(module, "Runtime", ", and rebuild the engines with it")
        if problem is not None:
            raise BackendError(f"Backend '{backend}' | {problem}")
        return cast(TrtModule, module), str(module.__version__)

    # -- the manifest record ----------------------------------------------------------
    def check_record(
        self, record: Any, *, running_version: str, running_capability: str, where: str
    ) -> dict[str, Any]:
        """Validate the manifest's ``backends["tensorrt"]`` record against the running
        library and GPU: engines only load under the version that built them and on a
        compute capability they were built for."""
        if not isinstance(record, dict):
            raise BackendError(
                f"{where} | has no TensorRT engines (no backends.tensorrt record) | build the folder with "
                "TensorRT engines on this GPU, or use backend='onnxruntime'"
            )
        missing = [key for key in (self.version_key, *self._device_keys(), "engines") if key not in record]
        if missing:
            raise BackendError(f"{where} | {self.title} record lacks {missing} | rebuild the engines")
        built = str(record[self.version_key])
        if built != running_version:
            raise BackendError(
                f"{where} | engines were built with {self.title} {built}, this is {self.title} "
                f"{running_version} | rebuild the engines with this {self.title}, or install "
                f"{self.module_name}=={built}"
            )
        self._check_device(record, running_capability, where)
        engines = record["engines"]
        if not isinstance(engines, dict) or sorted(engines) not in (
            sorted(GRAPH_ROLES),
            sorted(GRAPH_ROLES + GATE_TABLE_ROLES),
        ):
            raise BackendError(
                f"{where} | TensorRT record lists engines {engines!r}, expected one per role "
                f"{list(GRAPH_ROLES)} (and optionally {list(GATE_TABLE_ROLES)}) | rebuild the engines"
            )
        return record

    def _device_keys(self) -> tuple[str, ...]:
        raise NotImplementedError

    def _check_device(self, record: dict[str, Any], running_capability: str, where: str) -> None:
        raise NotImplementedError

    def no_gpu(self, record: Any) -> str:
        """The "problem | fix" of the error for a machine with no visible CUDA GPU."""
        raise NotImplementedError

    def describe(self, record: dict[str, Any]) -> str:
        """The record in words, for ``fora-export info``."""
        raise NotImplementedError

    # -- running ----------------------------------------------------------------------
    def check_plan(self, trt: TrtModule, runtime: tensorrt.Runtime, blob: bytes, path: str) -> None:
        """Refuse a serialized engine this library cannot run on this GPU, before
        deserializing it (where the flavour can tell)."""

    def configure_runtime_config(self, trt: TrtModule, runtime_config: Any) -> None:
        """Flavour settings of an ``IRuntimeConfig`` a context is created with."""


class DatacenterTensorRT(TrtFlavor):
    """``tensorrt`` 10.1+ / 11.x: engines built on, and for, the GPU that runs them."""

    name = "tensorrt"
    title = "TensorRT"
    module_name = "tensorrt"
    install = TENSORRT_INSTALL
    min_version = MIN_TENSORRT_VERSION
    version_key = "tensorrt_version"
    min_version_reason = "device_memory_size_v2, set_device_memory with a size"

    def _device_keys(self) -> tuple[str, ...]:
        return ("compute_capability",)

    def _check_device(self, record: dict[str, Any], running_capability: str, where: str) -> None:
        capability = str(record["compute_capability"])
        if capability != running_capability:
            raise BackendError(
                f"{where} | engines were built for compute capability {capability} "
                f"({record.get('gpu', '?')}), this GPU has {running_capability} | rebuild the engines on "
                "this GPU"
            )

    def no_gpu(self, record: Any) -> str:
        return (
            "no CUDA GPU is visible (torch.cuda.is_available() is False) "
            "| run on a machine with an NVIDIA GPU and CUDA torch, or use backend='onnxruntime'"
        )

    def describe(self, record: dict[str, Any]) -> str:
        return (
            f"tensorrt (TensorRT {record.get(self.version_key, '?')} engines for {record.get('gpu', '?')}, "
            f"compute capability {record.get('compute_capability', '?')})"
        )


class TensorRTRTX(TrtFlavor):
    """TensorRT for RTX (``tensorrt_rtx_bindings`` 1.x): plans built anywhere, no GPU needed,
    for a list of RTX compute capabilities; they finish compiling on the GPU at first run."""

    name = "tensorrt-rtx"
    title = "TensorRT-RTX"
    module_name = "tensorrt_rtx_bindings"
    install = RTX_INSTALL
    # The release whose Python API these modules were introspected and tested against.
    min_version = (1, 7)
    version_key = "tensorrt_rtx_version"
    min_version_reason = "the API these modules were written against"
    #: The record key listing the target compute capabilities.
    targets_key: ClassVar[str] = "compute_capabilities"

    def upgrade_advice(self) -> str:
        return f"install: {RTX_INSTALL}"

    def targets(self, record: Any) -> list[str]:
        found = record.get(self.targets_key) if isinstance(record, dict) else None
        return [str(cc) for cc in found] if isinstance(found, list) else []

    def _device_keys(self) -> tuple[str, ...]:
        return (self.targets_key,)

    def _check_device(self, record: dict[str, Any], running_capability: str, where: str) -> None:
        targets = self.targets(record)
        if running_capability not in targets:
            raise BackendError(
                f"{where} | TensorRT-RTX plans were built for compute capabilities {', '.join(targets)} "
                f"(RTX GPUs), this GPU has {running_capability} | run them on one of those GPUs, or "
                f"rebuild with --compute-capabilities {running_capability} if TensorRT-RTX supports it "
                "(it does not support datacenter GPUs such as the H100/H200); or use backend='onnxruntime'"
            )

    def no_gpu(self, record: Any) -> str:
        targets = ", ".join(self.targets(record)) or "?"
        return (
            f"the folder holds TensorRT-RTX plans for RTX GPUs (compute capability {targets}) and no "
            "CUDA GPU is visible here (torch.cuda.is_available() is False), so they cannot run on this "
            "machine | run them on an RTX GPU with CUDA torch and TensorRT-RTX, or use backend='onnxruntime'"
        )

    def describe(self, record: dict[str, Any]) -> str:
        return (
            f"tensorrt (TensorRT-RTX {record.get(self.version_key, '?')} plans for compute capability "
            f"{', '.join(self.targets(record)) or '?'}; they run on RTX GPUs only)"
        )

    def check_plan(self, trt: TrtModule, runtime: tensorrt.Runtime, blob: bytes, path: str) -> None:
        rtx = cast(Any, trt)
        validity, diagnostics = cast(_ValidityRuntime, runtime).get_engine_validity(blob)
        if validity == rtx.EngineValidity.INVALID:
            reasons = [
                name.lower().replace("_", " ")
                for name, flag in rtx.EngineInvalidityDiagnostics.__members__.items()
                if int(diagnostics) & int(flag)
            ]
            why = ", ".join(reasons) or "no reason given"
            raise BackendError(
                f"{path} | TensorRT-RTX cannot run this plan here ({why}; see the TensorRT-RTX error "
                "above) | rebuild the plans with this TensorRT-RTX, for this GPU"
            )

    def configure_runtime_config(self, trt: TrtModule, runtime_config: Any) -> None:
        runtime_config.dynamic_shapes_kernel_specialization_strategy = cast(
            Any, trt
        ).DynamicShapesKernelSpecializationStrategy.EAGER


DATACENTER = DatacenterTensorRT()
RTX = TensorRTRTX()
FLAVORS: dict[str, TrtFlavor] = {flavor.name: flavor for flavor in (DATACENTER, RTX)}


def flavor_of(record: Any, *, where: str) -> TrtFlavor:
    """The flavour of a manifest's ``backends["tensorrt"]`` record (datacenter TensorRT when
    the record names none, or there is no record: its check then refuses the folder)."""
    name = record.get("flavor", DATACENTER.name) if isinstance(record, dict) else DATACENTER.name
    flavor = FLAVORS.get(str(name))
    if flavor is None:
        raise BackendError(
            f"{where} | TensorRT record has flavor {name!r}, expected one of {sorted(FLAVORS)} "
            "| rebuild the engines, or update fora-runtime"
        )
    return flavor


def check_build_record(
    record: Any, *, running_version: str, running_capability: str, where: str
) -> dict[str, Any]:
    """Validate a ``backends["tensorrt"]`` record of either flavour against the running
    library version and GPU compute capability."""
    return flavor_of(record, where=where).check_record(
        record, running_version=running_version, running_capability=running_capability, where=where
    )


def describe_record(record: Any) -> str:
    """A ``backends["tensorrt"]`` record in words (for ``fora-export info``)."""
    if not isinstance(record, dict):
        return "tensorrt (unreadable record)"
    flavor = FLAVORS.get(str(record.get("flavor", DATACENTER.name)))
    return flavor.describe(record) if flavor is not None else f"tensorrt (flavor {record.get('flavor')!r})"
