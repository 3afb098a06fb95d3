"""How engine builds differ between datacenter TensorRT and TensorRT-RTX.

``fora_export/builder/tensorrt.py`` builds engines with either flavour through the
same code; what differs on the build side is here (the runtime side, which this
module builds on, is ``fora_runtime/backends/trt_flavor.py``):

- datacenter TensorRT (``--backend tensorrt``) builds on, and for, the visible GPU;
  its manifest record names that GPU and its compute capability; builds share a
  timing cache;
- TensorRT-RTX (``--backend tensorrt-rtx``) needs no GPU: the plans are compiled
  ahead of time for a list of target compute capabilities (``--compute-capabilities``,
  default ``DEFAULT_RTX_TARGETS``) and finish compiling on the RTX GPU at first run.
  Its record lists the targets. No timing cache: TensorRT-RTX documents that it has
  no effect on the plan and that using one makes the build query for a GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol, cast

from fora_export.errors import BuildError
from fora_runtime.backends.trt_flavor import (
    DATACENTER,
    RTX,
    TrtFlavor,
    TrtModule,
    compute_capability_key,
)
from fora_runtime.errors import BackendError

if TYPE_CHECKING:
    import tensorrt

    from fora_export.builder.trt_config import TrtBuildConfig

#: TensorRT-RTX targets when none are given: the RTX generations it builds fp32, fp16 and
#: bf16 plans for (Ampere 8.6, Ada 8.9, Blackwell 12.0). Turing (7.5) is opt-in, as
#: TensorRT-RTX itself makes it: it has no fp32 GEMM or bf16 there (an fp32 build for 7.5
#: fails: "FP32 GEMM is not supported").
DEFAULT_RTX_TARGETS = ("8.6", "8.9", "12.0")


class _RtxBuilderConfig(Protocol):
    """The TensorRT-RTX ``IBuilderConfig`` members that set target compute capabilities."""

    num_compute_capabilities: int

    def set_compute_capability(self, compute_capability: Any, index: int) -> bool: ...


class BuildFlavor:
    """One TensorRT flavour, as the engine builder sees it."""

    #: The runtime's view of the flavour: module, versions, record keys.
    runtime: ClassVar[TrtFlavor]
    #: The ``fora-export build --backend`` value that builds it.
    backend: ClassVar[str]
    #: Whether builds read and write ``timing.cache``.
    uses_timing_cache: ClassVar[bool]

    @property
    def title(self) -> str:
        return self.runtime.title

    def load(self) -> tuple[TrtModule, str]:
        """The flavour's module and version, or a BuildError saying why there is none."""
        try:
            return self.runtime.load(backend=self.backend)
        except BackendError as err:
            parts = str(err).split(" | ")
            problem, fix = parts[1:3] if len(parts) >= 3 else (str(err), self.runtime.install)
            raise BuildError(f"{self.title} | {problem} | {fix}") from err

    def available(self) -> tuple[bool, str]:
        """Whether engines of this flavour can be built here, and why."""
        raise NotImplementedError

    def check_config(self, config: TrtBuildConfig) -> None:
        """Refuse build settings this flavour has no use for."""

    def configure(
        self, trt: TrtModule, builder_config: tensorrt.IBuilderConfig, config: TrtBuildConfig
    ) -> None:
        """Flavour settings of a builder config (after the common ones)."""

    def device_record(self, config: TrtBuildConfig) -> dict[str, Any]:
        """The manifest record's fields saying where the engines run."""
        raise NotImplementedError


def cuda_device() -> tuple[str, str]:
    """(name, compute capability "major.minor") of the current CUDA device."""
    try:
        import torch
    except ImportError as err:  # pragma: no cover - torch is a fora-export dependency
        raise BuildError(f"TensorRT | cannot import torch ({err}) | install torch with CUDA support") from err
    if not torch.cuda.is_available():
        raise BuildError(
            "TensorRT | no CUDA GPU is visible (torch.cuda.is_available() is False) "
            "| build TensorRT engines on the GPU machine that will run them"
        )
    device = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


def problem_of(err: BuildError) -> str:
    """The middle ("problem") part of a ``subject | problem | fix`` message."""
    parts = str(err).split(" | ")
    return parts[1] if len(parts) > 1 else parts[0]


class DatacenterBuild(BuildFlavor):
    """Datacenter TensorRT: engines for the GPU that builds them."""

    runtime = DATACENTER
    backend = "tensorrt"
    uses_timing_cache = True

    def load(self) -> tuple[TrtModule, str]:
        try:
            import tensorrt as trt
        except ImportError as err:
            raise BuildError(
                f"TensorRT | cannot import 'tensorrt' ({err}) | install it (pip install tensorrt) on a "
                "machine with an NVIDIA GPU, or build without TensorRT engines"
            ) from err
        problem = self.runtime.unusable(trt, "Builder", ", or build without TensorRT engines")
        if problem is not None:
            raise BuildError(f"TensorRT | {problem}")
        return cast(TrtModule, trt), str(trt.__version__)

    def available(self) -> tuple[bool, str]:
        try:
            _, version = self.load()
        except BuildError as err:
            return False, problem_of(err)
        short = ".".join(version.split(".")[:2])
        try:
            gpu, _ = cuda_device()
        except BuildError as err:
            return False, f"tensorrt {short} imported, but {problem_of(err)}"
        return True, f"tensorrt {short} imported and GPU {gpu} visible"

    def check_config(self, config: TrtBuildConfig) -> None:
        if config.compute_capabilities is not None:
            raise BuildError(
                "--compute-capabilities | TensorRT builds for the GPU it runs on | leave it out, or build "
                "TensorRT-RTX plans for other GPUs with --backend tensorrt-rtx"
            )

    def device_record(self, config: TrtBuildConfig) -> dict[str, Any]:
        gpu, capability = cuda_device()
        return {"gpu": gpu, "compute_capability": capability}


class RtxBuild(BuildFlavor):
    """TensorRT-RTX: plans compiled without a GPU for a list of RTX compute capabilities."""

    runtime = RTX
    backend = "tensorrt-rtx"
    uses_timing_cache = False

    def available(self) -> tuple[bool, str]:
        try:
            _, version = self.load()
        except BuildError as err:
            return False, problem_of(err)
        return True, f"tensorrt-rtx {version} imported (its builds need no GPU)"

    def targets(self, config: TrtBuildConfig) -> tuple[str, ...]:
        """The compute capabilities the plans are built for, in ascending order."""
        chosen = config.compute_capabilities or DEFAULT_RTX_TARGETS
        return tuple(sorted(set(chosen), key=compute_capability_key))

    def configure(
        self, trt: TrtModule, builder_config: tensorrt.IBuilderConfig, config: TrtBuildConfig
    ) -> None:
        members = cast(Any, trt).ComputeCapability.__members__
        # Enum members are named SM<major><minor> (SM86, SM120); NONE and CURRENT are not targets.
        supported = {
            f"{name[2:-1]}.{name[-1]}": member for name, member in members.items() if name[2:].isdigit()
        }
        targets = self.targets(config)
        unknown = [cc for cc in targets if cc not in supported]
        if unknown:
            have = ", ".join(sorted(supported, key=compute_capability_key))
            raise BuildError(
                f"--compute-capabilities | TensorRT-RTX {trt.__version__} cannot build for "
                f"{', '.join(unknown)} | choose from {have}"
            )
        rtx_config = cast(_RtxBuilderConfig, builder_config)
        rtx_config.num_compute_capabilities = len(targets)
        for index, capability in enumerate(targets):
            if not rtx_config.set_compute_capability(supported[capability], index):
                raise BuildError(
                    f"--compute-capabilities | TensorRT-RTX refused target {capability} | choose from "
                    f"{', '.join(sorted(supported, key=compute_capability_key))}"
                )

    def device_record(self, config: TrtBuildConfig) -> dict[str, Any]:
        # No GPU is involved: the plans run on any GPU of these compute capabilities.
        return {"gpu": None, RTX.targets_key: list(self.targets(config))}


DATACENTER_BUILD = DatacenterBuild()
RTX_BUILD = RtxBuild()
#: ``--backend`` value -> flavour.
BUILD_FLAVORS: dict[str, BuildFlavor] = {flavor.backend: flavor for flavor in (DATACENTER_BUILD, RTX_BUILD)}
