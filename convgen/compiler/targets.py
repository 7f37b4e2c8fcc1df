"""Target names -> TVM targets, and what the rest of convgen needs to know about them.

Accepted: `llvm` / `cpu` (the host CPU, detected: mcpu and core count),
`llvm:<mcpu>` (cross-compile for another x86/Arm CPU), `cuda` (sm_90),
`cuda:sm_80` (any arch), or a JSON dict passed to `tvm.target.Target` as is.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from convgen.errors import SpecError
from convgen.runtime.kernel import available_cores

DEFAULT_CUDA_ARCH = "sm_90"


@dataclass(frozen=True)
class TargetInfo:
    """A resolved target: its TVM dict, and the facts schedules and the runtime need."""

    kind: str  # "llvm" or "cuda"
    config: tuple[tuple[str, Any], ...]  # the dict given to tvm.target.Target, frozen

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def config_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, tuple) else v) for k, v in self.config}

    @property
    def arch(self) -> str:
        """sm_XX for CUDA, the LLVM mcpu for CPUs."""
        d = self.config_dict
        return str(d.get("arch", DEFAULT_CUDA_ARCH) if self.is_cuda else d.get("mcpu", "generic"))

    @property
    def num_cores(self) -> int:
        return int(self.config_dict.get("num-cores", available_cores()))

    def key(self) -> str:
        """Names the hardware a schedule was tuned for (the record library's folder):
        the CUDA arch, or the CPU model and its vector ISA."""
        if self.is_cuda:
            return f"cuda-{self.arch}"
        return f"llvm-{self.arch}-{self.vector_isa()}"

    def tvm_target(self) -> Any:
        import tvm

        d = self.config_dict
        if self.is_cuda:
            # Precompiled artifacts: the host wrappers are emitted as CUDA C++
            # ("cuda_host") and nvcc compiles host and device code into one .so.
            d.setdefault("host", {"kind": "cuda_host"})
        return tvm.target.Target(d)

    def vector_isa(self) -> str:
        """The widest SIMD instruction set of the target's CPU (not of this machine)."""
        if self.is_cuda:
            return "cuda"
        from tvm.target import codegen

        features = set(codegen.llvm_get_cpu_features(self.tvm_target()))
        for isa, needs in (("avx512", "avx512f"), ("avx2", "avx2"), ("avx", "avx"),
                           ("sve", "sve"), ("neon", "neon"), ("sse2", "sse2")):
            if needs in features:
                return isa
        return "scalar"

    def vector_bits(self) -> int:
        """SIMD register width in bits (SVE counted at its 128-bit minimum)."""
        return {"avx512": 512, "avx2": 256, "avx": 256}.get(self.vector_isa(), 128)


def host_cpu() -> str:
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


def resolve_target(name: str) -> TargetInfo:
    """A user's target string -> TargetInfo. Raises SpecError naming `target`."""
    text = name.strip()
    if text.startswith("{"):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as err:
            raise SpecError(f"target: {name!r} is not valid JSON: {err.msg}") from None
        if not isinstance(d, dict) or d.get("kind") not in ("llvm", "cuda"):
            raise SpecError(f"target: {name!r} must be a dict with kind llvm or cuda")
        kind = d["kind"]
        if kind == "llvm":
            d.setdefault("mcpu", host_cpu())
            d.setdefault("num-cores", available_cores())
        else:
            d.setdefault("arch", DEFAULT_CUDA_ARCH)
        return TargetInfo(kind, _freeze(d))
    low = text.lower()
    base, _, arg = low.partition(":")
    if base in ("llvm", "cpu", "host"):
        mcpu = arg or host_cpu()
        return TargetInfo("llvm", _freeze({"kind": "llvm", "mcpu": mcpu,
                                           "num-cores": available_cores()}))
    if base in ("cuda", "gpu", "nvidia"):
        arch = arg or DEFAULT_CUDA_ARCH
        if not re.fullmatch(r"sm_\d{2,3}a?", arch):
            raise SpecError(f"target: {name!r}: CUDA arch must look like sm_90 or sm_80")
        return TargetInfo("cuda", _freeze({"kind": "cuda", "arch": arch}))
    raise SpecError(
        f"target: {name!r} is not one of llvm, cpu, llvm:<mcpu>, cuda, cuda:sm_XX "
        "or a JSON dict"
    )


def _freeze(d: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(
        (k, tuple(sorted(v.items())) if isinstance(v, dict) else v) for k, v in sorted(d.items())
    )
