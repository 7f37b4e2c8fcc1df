"""Target names -> TVM targets, and the one hardware model schedules ask for facts.

Accepted: `llvm` / `cpu` (the host CPU, detected: mcpu and core count),
`llvm:<mcpu>` (cross-compile for another x86/Arm CPU), `cuda` (sm_90),
`cuda:sm_80` (any arch), or a JSON dict passed to `tvm.target.Target` as is.

Every fact of the hardware a schedule relies on (vector width and registers, FMA
and load issue rates, L2, SM count, shared memory per block, compute capability,
warp size) is a property of `TargetInfo`, asked of it, never written into a
template as a literal.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from convgen.errors import TargetError
from convgen.runtime.cores import available_cores
from convgen.runtime.kernel import CACHE_LINE
from convgen.runtime.manifest import VECTOR_BITS

DEFAULT_CUDA_ARCH = "sm_90"
# Streaming multiprocessors of each architecture's data-centre part (the GPU a
# kernel for that arch is most often tuned on): V100, T4, A100, A40, L4,
# H100/H200, B200.
SM_COUNT = {70: 80, 75: 40, 80: 108, 86: 84, 89: 58, 90: 132, 100: 148}
# Private L2 per core, by LLVM CPU name (the vendors' data sheets); others: 512 KiB,
# the size of the smaller parts in use (Zen 2/3, Ice Lake client).
L2_BYTES = {"znver4": 1 << 20, "znver5": 1 << 20, "skylake-avx512": 1 << 20,
            "cascadelake": 1 << 20, "cooperlake": 1 << 20, "icelake-server": 5 << 18,
            "sapphirerapids": 2 << 20, "emeraldrapids": 2 << 20, "graniterapids": 2 << 20}
# FMA width a core issues per cycle, by LLVM CPU name: two 512-bit FMA units (Zen 5,
# the Gold and Platinum Xeon Scalable parts; some lower ones have one); others two
# 256-bit ones (Zen 2-4, Intel client), on which a 512-bit FMA issues once a cycle, as
# two halves.
FMA_BITS_PER_CYCLE = {"znver5": 1024, "skylake-avx512": 1024, "cascadelake": 1024,
                      "cooperlake": 1024, "icelake-server": 1024, "sapphirerapids": 1024,
                      "emeraldrapids": 1024, "graniterapids": 1024}
FMA_PIPES = 2
DEFAULT_FMA_BITS_PER_CYCLE = 512
# Loads (vectors or scalar broadcasts) a core issues per cycle, by LLVM CPU name: Zen 5
# has four load pipes (two of them for 512-bit vectors, AMD's optimization guide);
# others at least 2, as every x86 core since Haswell and Zen 1.
LOADS_PER_CYCLE = {"znver5": 4}
DEFAULT_LOADS_PER_CYCLE = 2
# Static shared memory a block may declare (larger needs dynamic allocation and an
# opt-in attribute, which TVM's CUDA codegen does not emit).
STATIC_SMEM_PER_BLOCK = 48 * 1024


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

    def tvm_target(self, model: bool = False) -> Any:
        """The TVM target. CUDA kernels: the host wrappers are emitted as CUDA C++
        ("cuda_host") and nvcc compiles host and device code into one .so. CUDA models
        (`model`): the Relax VM and the host side of every kernel are LLVM code for
        this machine's CPU, the device code is compiled by nvcc through TVM."""
        import tvm

        d = self.config_dict
        if self.is_cuda:
            d.setdefault("host", {"kind": "llvm"} if model else {"kind": "cuda_host"})
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
        return VECTOR_BITS.get(self.vector_isa(), 128)

    # ---- the CPU model ------------------------------------------------------------

    @property
    def fp32_lanes(self) -> int:
        """float32 lanes of the vectors CPU schedules tile by: the full SIMD width,
        512-bit with AVX-512. Where two 512-bit FMA units exist (Xeon Skylake-SP and
        later server parts, Zen 5) that doubles the FMA throughput; where a 512-bit
        FMA runs as two 256-bit halves (Zen 4) the peak is the same, but a register
        tile then needs half the loads, broadcasts and instructions per FMA: the
        heuristics' 1x1 tiles ran 1.05-1.67x faster on Zen 4 at 16 lanes than at 8
        (benchmarks/NOTES.md)."""
        return self.vector_bits() // 32

    @property
    def vector_registers(self) -> int:
        """Architectural vector registers: 32 with AVX-512 (ymm16-31 through AVX-512VL)
        and on Arm, 16 on AVX2/AVX/SSE x86."""
        return 16 if self.vector_isa() in ("avx2", "avx", "sse2") else 32

    def fmas_per_cycle(self, lanes: int) -> float:
        """Vector FMAs of `lanes` float32 lanes a core issues per cycle: its FMA width
        per cycle over the vector's, at most one per FMA pipe."""
        return min(float(FMA_PIPES),
                   FMA_BITS_PER_CYCLE.get(self.arch, DEFAULT_FMA_BITS_PER_CYCLE) / (32 * lanes))

    def fma_lanes_per_cycle(self, lanes: int) -> float:
        """float32 lanes a core's FMAs cover per cycle with vectors of `lanes`."""
        return self.fmas_per_cycle(lanes) * lanes

    @property
    def loads_per_cycle(self) -> int:
        """Loads (vectors or broadcasts) a core issues per cycle."""
        return LOADS_PER_CYCLE.get(self.arch, DEFAULT_LOADS_PER_CYCLE)

    @property
    def cache_line_bytes(self) -> int:
        """The unit caches move and a prefetch fetches (the runtime aligns to it too)."""
        return CACHE_LINE

    @property
    def l2_bytes(self) -> int:
        """A core's private L2 cache: what a parallel task's working set must fit in
        to be reread without going to the shared L3 or memory."""
        return L2_BYTES.get(self.arch, 512 << 10)

    # ---- the GPU model ------------------------------------------------------------

    @property
    def compute_capability(self) -> int:
        """sm_90 -> 90 (sm_90a -> 90)."""
        return int(self.arch.removeprefix("sm_").rstrip("a"))

    @property
    def sm_count(self) -> int:
        """Streaming multiprocessors: the parallelism a grid of blocks must fill."""
        known = [cc for cc in SM_COUNT if cc <= self.compute_capability]
        return SM_COUNT[max(known)] if known else SM_COUNT[min(SM_COUNT)]

    @property
    def smem_per_block(self) -> int:
        """Bytes of static shared memory one block may declare."""
        return STATIC_SMEM_PER_BLOCK

    @property
    def warp_size(self) -> int:
        return 32


def host_cpu() -> str:
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


# The oldest architecture nvcc 12 compiles for.
MIN_CUDA_ARCH = 50


def _check_cpu(mcpu: str, triple: str | None, name: str) -> None:
    """A CPU name LLVM does not know would compile, silently, for a generic x86-64
    (a typo such as znver33 then costs half the speed): refuse it."""
    from tvm.target import codegen

    if not codegen.llvm_is_valid_cpu(mcpu, triple or codegen.llvm_get_system_triple()):
        raise TargetError(f"target: {name!r}: LLVM knows no CPU {mcpu!r} (e.g. znver3, "
                          "znver4, skylake-avx512, x86-64-v3; `llvm` alone: this machine's)")


def _check_arch(arch: str, name: str) -> None:
    found = re.fullmatch(r"sm_(\d{2,3})a?", arch)
    if not found:
        raise TargetError(f"target: {name!r}: CUDA arch must look like sm_90 or sm_80")
    if int(found.group(1)) < MIN_CUDA_ARCH:
        raise TargetError(f"target: {name!r}: nvcc compiles for sm_{MIN_CUDA_ARCH} and newer")


def resolve_target(name: str) -> TargetInfo:
    """A user's target string -> TargetInfo. Raises TargetError naming `target`."""
    text = name.strip()
    if text.startswith("{"):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as err:
            raise TargetError(f"target: {name!r} is not valid JSON: {err.msg}") from None
        if not isinstance(d, dict) or d.get("kind") not in ("llvm", "cuda"):
            raise TargetError(f"target: {name!r} must be a dict with kind llvm or cuda")
        kind = d["kind"]
        if kind == "llvm":
            if "mcpu" in d:
                _check_cpu(str(d["mcpu"]), d.get("mtriple"), name)
            d.setdefault("mcpu", host_cpu())
            d.setdefault("num-cores", available_cores())
        else:
            d.setdefault("arch", DEFAULT_CUDA_ARCH)
            _check_arch(str(d["arch"]), name)
        return TargetInfo(kind, _freeze(d))
    low = text.lower()
    base, _, arg = low.partition(":")
    if base in ("llvm", "cpu", "host"):
        arg = "" if arg == "native" else arg  # (clang's word for this machine's CPU)
        if arg:
            _check_cpu(arg, None, name)
        mcpu = arg or host_cpu()
        return TargetInfo("llvm", _freeze({"kind": "llvm", "mcpu": mcpu,
                                           "num-cores": available_cores()}))
    if base in ("cuda", "gpu", "nvidia"):
        arch = arg or DEFAULT_CUDA_ARCH
        _check_arch(arch, name)
        return TargetInfo("cuda", _freeze({"kind": "cuda", "arch": arch}))
    raise TargetError(
        f"target: {name!r} is not one of llvm, cpu, llvm:<mcpu>, cuda, cuda:sm_XX "
        "or a JSON dict"
    )


def _freeze(d: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(
        (k, tuple(sorted(v.items())) if isinstance(v, dict) else v) for k, v in sorted(d.items())
    )
