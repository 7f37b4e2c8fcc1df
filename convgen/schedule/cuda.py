"""CUDA schedules.

Templates, tried in order:
  * `cuda_implicit_gemm` (groups == 1): TVM dlight's GPU Matmul rule. It
    recognises the conv block as a GEMM over (N*spatial) x K x (C*R*S), gathers
    the im2col tiles into shared memory, keeps the accumulator in registers and
    fuses the bias/cast epilogue; for float16 with every GEMM dimension >= 64 it
    uses the tensor cores (wmma). (Its first tensor-core use in a process
    imports tvm.s_tir.tensor_intrin.cuda, about 18 s here.)
The fallback (`cuda_direct`, every spec, and the depthwise path for now): one
thread per output element with the float32 sum in a register.

dlight's other rules were measured to be worse for convolutions: on grouped
convs GeneralReduction puts 256 threads on each output's short reduction, and
Fallback accumulates in global memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from convgen.schedule.common import Template, has_block, new_schedule
from convgen.spec import ConvSpec
from convgen.targets import TargetInfo

if TYPE_CHECKING:
    from tvm.s_tir import Schedule
    from tvm.tirx import PrimFunc

FALLBACK_NAME = "cuda_direct"

# 128 threads a block: 4 warps let several blocks share an SM, and it divides
# the common output sizes without many idle lanes.
FALLBACK_THREADS = 128


@dataclass(frozen=True)
class ImplicitGemmKnobs:
    """dlight's Matmul rule picks its own tiles from the target; nothing to set yet."""

    rule: str = "dlight.gpu.Matmul"


def _implicit_gemm_knobs(spec: ConvSpec, target: TargetInfo) -> ImplicitGemmKnobs | None:
    # With groups the channel index is (k // Kg) * Cg + rc: not a GEMM operand.
    return ImplicitGemmKnobs() if spec.groups == 1 else None


def _implicit_gemm(
    func: PrimFunc, spec: ConvSpec, target: TargetInfo, knobs: ImplicitGemmKnobs
) -> Schedule | None:
    import tvm
    from tvm.s_tir import dlight as dl

    from convgen.compute import ENTRY

    tvm_target = target.tvm_target()
    with tvm_target:
        mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul())(tvm.IRModule({ENTRY: func}))
    scheduled = mod[ENTRY]
    if not scheduled.attrs.get("tirx.is_scheduled", False):
        return None
    return new_schedule(scheduled)


TEMPLATES: list[Template[Any]] = [
    Template(
        "cuda_implicit_gemm",
        ImplicitGemmKnobs,
        _implicit_gemm_knobs,
        lambda spec, target: [k for k in [_implicit_gemm_knobs(spec, target)] if k],
        _implicit_gemm,
    ),
]


def fallback(func: PrimFunc, spec: ConvSpec, target: TargetInfo) -> Schedule:
    """One thread per output element, the float32 sum in a register. Correct for every spec."""
    from tvm import tirx

    sch = new_schedule(func)
    if has_block(sch, "pad"):
        sch.compute_inline(sch.get_sblock("pad"))  # padding becomes a guarded load
    conv = sch.get_sblock("conv")
    # conv accumulates into a local (register) buffer; `wb` copies it out.
    wb = sch.cache_write(conv, 0, "local")
    if has_block(sch, "out"):
        # fold bias + cast into the write-back: the float32 sum never touches memory
        sch.reverse_compute_inline(sch.get_sblock("out"))
    # Bind conv's own output loops and hang the write-back under the thread loop
    # (binding wb first and moving conv under it made conv's bindings non-affine
    # on some shapes, and decompose_reduction then failed).
    loops = sch.get_loops(conv)
    n_spatial = sum(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(conv).iter_vars)
    bx, tx = sch.split(sch.fuse(*loops[:n_spatial]), [None, FALLBACK_THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.reverse_compute_at(wb, tx)
    sch.decompose_reduction(conv, sch.get_loops(conv)[2])  # zero once, before the reduction
    return sch
