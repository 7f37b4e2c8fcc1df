"""CUDA code generation and nvcc compilation (no GPU needed; nvcc ~4 s a kernel on
2 cores, so a handful of cases rather than the whole table)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from convgen.compiler.build import build_artifact, compile_kernel
from convgen.compiler.targets import resolve_target
from convgen.errors import UnsupportedError
from convgen.spec import ConvSpec, make_spec

pytestmark = pytest.mark.cuda

CUDA_CASES = [
    # implicit GEMM, float32, with the flip, 'same' padding and a residual + ReLU epilogue
    dict(mode="conv", input="1x16x14x14", kernel="32x16x3x3", padding="same", residual=True,
         activation="relu"),
    # depthwise, channels-last, bias, ReLU6
    dict(mode="corr", input="1x10x10x8", kernel="8x3x3x1", padding=1, groups=8, layout="NHWC",
         bias=True, activation="relu6"),
    # float16 with bias, 1-D, strided, SiLU
    dict(mode="conv", input="2x8x33", kernel="16x8x5", padding=2, stride=2, dtype="float16",
         bias=True, activation="silu"),
]


@pytest.mark.parametrize("flags", CUDA_CASES, ids=lambda f: make_spec(**f).name())
def test_cuda_artifact_compiles(flags, tmp_path):
    spec = make_spec(**flags)
    art = build_artifact(spec, resolve_target("cuda"), tmp_path, emit_source=True)
    m = art.manifest
    so = m.path_of("module", tmp_path)
    assert so.is_file() and so.stat().st_size == m.files["module"].size > 0
    assert "__global__" in m.path_of("cuda_source", tmp_path).read_text()
    assert m.target.cuda_arch == "sm_90"
    from convgen.runtime.cuda_driver import gpu_present

    if not gpu_present():
        assert m.verification.status == "not run"
        assert "no GPU present" in m.verification.reason
    # the module loads with tvm-ffi alone, GPU or not
    import tvm_ffi

    assert tvm_ffi.load_module(str(so.resolve()))["convgen_main"] is not None


def test_deferred_nvcc_then_compile(tmp_path):
    from convgen.runtime.kernel import load
    from convgen.runtime.nvcc import compile_artifacts

    spec = make_spec(mode="conv", input="1x4x8x8", kernel="4x4x3x3", padding=1)
    art = build_artifact(spec, resolve_target("cuda:sm_80"), tmp_path, defer_nvcc=True)
    assert not (tmp_path / f"{spec.name()}.so").exists()
    with pytest.raises(Exception, match="convgen compile"):
        _ = load(tmp_path).func
    [(name, _)] = compile_artifacts(tmp_path)
    assert name == spec.name() and (tmp_path / f"{spec.name()}.so").is_file()
    assert json.loads(art.manifest_path.read_text())["module_compiled"] is True


def test_host_only_code_is_refused(monkeypatch):
    """An unscheduled PrimFunc compiled for CUDA becomes host code with no GPU kernel:
    the build must fail loudly rather than ship it."""
    import convgen.compiler.build
    from convgen.compiler.compute import conv_prim_func
    from convgen.compiler.schedule.common import new_schedule
    from convgen.runtime.manifest import ScheduleChoice

    def unscheduled(spec, target, library=None, algorithm="auto"):
        return new_schedule(conv_prim_func(spec, target)), ScheduleChoice("heuristic", "none")

    monkeypatch.setattr(convgen.compiler.build, "schedule_for", unscheduled)
    monkeypatch.setattr(convgen.compiler.build, "packed_schedule", lambda *_: None)
    spec = make_spec(mode="conv", input="1x2x6x6", kernel="2x2x3x3")
    with pytest.raises(UnsupportedError, match="no GPU kernel"):
        compile_kernel(spec, resolve_target("cuda"))


def test_cuda_tuning_round_trip_without_a_gpu(tmp_path):
    """Candidates are emitted here; results.json (written by `convgen measure` on the GPU
    machine, faked here) becomes a record that `convgen build` then uses."""
    from convgen.compiler.records import find_record
    from convgen.tuning.cuda_offline import emit_cuda_candidates, ingest_cuda_results
    from convgen.tuning.measure import INDEX, RESULTS

    target = resolve_target("cuda")
    spec = make_spec(mode="conv", input="1x16x14x14", kernel="32x16x3x3", padding=1)
    corr = make_spec(mode="corr", input="1x16x14x14", kernel="32x16x3x3", padding=1)
    # both modes run the same code on packed weights: one spec to tune, kept under corr
    n = emit_cuda_candidates([spec, corr], target, tmp_path / "cands")
    index = json.loads((tmp_path / "cands" / INDEX).read_text())
    [entry] = index["specs"]
    assert ConvSpec.from_dict(entry["spec"]) == corr
    cands = entry["candidates"]
    assert n == len(cands) >= 2 and cands[-1]["template"] == "cuda_direct"
    for c in cands:  # each candidate is a deferred artifact with its own schedule
        m = json.loads((tmp_path / "cands" / c["manifest"]).read_text())
        assert m["module_compiled"] is False and m["schedule"]["name"]
    timings = [0.5, 0.2] + [0.9] * (len(cands) - 2)
    rows = [{"template": c["template"], "knobs": c["knobs"], "median_ms": t, "error": ""}
            for c, t in zip(cands, timings)]
    rows[0]["median_ms"], rows[0]["error"] = None, "wrong result"
    (tmp_path / "cands" / RESULTS).write_text(json.dumps(
        {"device": "fake", "specs": {corr.name(): {"spec": corr.to_dict(), "candidates": rows}}}))
    assert len(ingest_cuda_results(tmp_path / "cands", tmp_path / "lib")) == 1
    record = find_record(spec, target, tmp_path / "lib")
    assert record is not None and record.measured["median_ms"] == 0.2
    want = cands[1]  # the fastest that computed the right thing
    assert (record.schedule.template, record.schedule.knobs) == (want["template"],
                                                                  want["knobs"])


def test_measure_compiles_candidates_into_loadable_kernels(tmp_path):
    """The device-side step up to the GPU: every candidate is compiled by nvcc and
    marked compiled, so it loads (loading a CUDA module needs no GPU)."""
    from convgen.runtime.kernel import Kernel
    from convgen.tuning.cuda_offline import emit_cuda_candidates
    from convgen.tuning.measure import INDEX, _compile_all

    spec = make_spec(mode="corr", input="1x8x8x8", kernel="8x3x3x1", padding=1, groups=8,
                     layout="NHWC")
    emit_cuda_candidates([spec], resolve_target("cuda"), tmp_path, per_template=1)
    index = json.loads((tmp_path / INDEX).read_text())
    assert _compile_all(tmp_path, index, jobs=2) == {}
    for cand in index["specs"][0]["candidates"]:
        assert Kernel(tmp_path / cand["manifest"]).func is not None


PACKED_CASES = [
    # implicit GEMM reads its bound weights output channels innermost (K=6: no vector)
    dict(mode="conv", input="2x5x9x7", kernel="6x5x3x2", padding=(1, 0, 2, 1), stride=(2, 1),
         dilation=(1, 2), bias=True),
    dict(mode="conv", input="1x6x6x8", kernel="16x3x3x8", padding=1, layout="NHWC",
         residual=True, activation="relu"),
    # storage order, flipped: depthwise and the direct fallback (grouped)
    dict(mode="conv", input="1x8x7x7", kernel="8x1x3x3", padding=1, groups=8),
    dict(mode="conv", input="1x6x5x5", kernel="6x2x3x3", padding=1, groups=3),
]


@pytest.mark.parametrize("flags", PACKED_CASES, ids=lambda f: make_spec(**f).name())
def test_cuda_packed_entries_compute_the_operator(flags):
    """A CUDA kernel's bound form: `convgen_pack` lays the weights out as its template
    reads them, the flip of `conv` applied, and `convgen_run_packed` computes
    cross-correlation on them. The same algorithm (the packing and run-packed
    PrimFuncs before the GPU schedule, which only reorders their loops) is compiled
    for the CPU here and checked against the oracle, so the layout and the flip are
    proven without a GPU."""
    import tvm
    from helpers import assert_close, random_case

    from convgen.compiler.build import lower
    from convgen.compiler.compute import conv_prim_func, pack_tensors
    from convgen.compiler.schedule.common import Variant
    from convgen.reference import reference_conv

    spec = make_spec(**flags)
    cuda, cpu = resolve_target("cuda"), resolve_target("llvm")
    mod, choice, packing = lower(spec, cuda)
    assert packing is not None, choice.describe()
    assert {"convgen_pack", "convgen_run_packed", "convgen_main"} <= {
        gv.name_hint for gv in mod.get_global_vars()}
    if choice.name == "cuda_igemm_f32":
        assert packing.lanes == spec.out_channels  # the B operand stored [K, N]
    pack = tvm.compile(tvm.IRModule({"main": tvm.te.create_prim_func(
        pack_tensors(spec, packing))}), target=cpu.tvm_target())
    run = tvm.compile(tvm.IRModule({"main": conv_prim_func(spec, cpu, Variant(
        packing=packing))}), target=cpu.tvm_target())
    inputs = random_case(spec, seed=3)
    packed = tvm.runtime.empty(packing.packed_shape(spec), spec.dtype)
    pack["main"](tvm.runtime.tensor(inputs["weight"]), packed)
    out = tvm.runtime.empty(spec.out_shape, spec.dtype)
    args = [tvm.runtime.tensor(v) for k, v in inputs.items() if k != "weight"]
    run["main"](args[0], packed, *args[1:], out)
    assert_close(out.numpy(), reference_conv(spec, *inputs.values()), spec.dtype)


def test_cuda_artifact_declares_its_packed_weights(tmp_path):
    """The manifest names the packed entries (`bind` calls them on the GPU), and a
    kernel's record is shared by both modes, as they run the same code."""
    from convgen.compiler.records import record_spec

    target = resolve_target("cuda")
    spec = make_spec(mode="conv", input="1x8x6x6", kernel="16x8x3x3", padding=1)
    m = build_artifact(spec, target, tmp_path, verify=False).manifest
    assert m.packed_weights is not None
    assert m.packed_weights.packed.shape == (1, 8, 3, 3, 16)
    assert record_spec(spec, target).mode == "corr"
    import tvm_ffi

    module = tvm_ffi.load_module(str(m.path_of("module", tmp_path).resolve()))
    assert module["convgen_pack"] is not None and module["convgen_run_packed"] is not None


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_split_k_sums_its_slices_through_the_workspace(layout):
    """Split-K as cuda_igemm_f32 applies it (`_split_k`: the reduction cut into slices
    whose partial sums go to a buffer that becomes the entry's workspace argument,
    then summed with the epilogue), without the GPU-only steps (thread binding,
    shared-memory stages), compiled for the CPU and checked against the oracle."""
    import numpy as np
    import tvm
    from helpers import assert_close, random_case

    from convgen.compiler.compute import conv_prim_func, workspace_as_argument
    from convgen.compiler.schedule import cuda
    from convgen.compiler.schedule.common import new_schedule
    from convgen.reference import reference_conv

    shapes = {"NCHW": ("1x24x5x5", "20x24x3x3"), "NHWC": ("1x5x5x24", "20x3x3x24")}
    spec = make_spec(mode="conv", input=shapes[layout][0], kernel=shapes[layout][1],
                     padding=1, layout=layout, bias=True, residual=True, activation="relu")
    cpu = resolve_target("llvm")
    sch = new_schedule(conv_prim_func(spec, cpu))
    conv = cuda._normalize_gemm(sch, spec, split_taps=True)
    m, n, _ = spec.gemm_shape
    cuda._pad_to(sch, conv, (m, n, 9, 24), (32, 32, 1, 8))  # M 25 -> 32, C 24 = 3 x 8
    _, _, _, c = sch.get_loops(conv)
    co, _ = sch.split(c, [None, 8])
    sch.fuse(sch.get_loops(conv)[2], co)  # 27 steps
    _, _, buffer, *_ = cuda._split_k(sch, conv, 3, m_inner=layout == "NCHW")
    func = workspace_as_argument(sch.mod["convgen_main"], buffer)
    ws = func.params[-1]
    want_shape = (3, 32, 32)  # slices x (N x M channels-first, M x N channels-last), padded
    assert tuple(int(x) for x in ws.shape) == want_shape
    lib = tvm.compile(tvm.IRModule({"main": func}), target=cpu.tvm_target())
    inputs = random_case(spec, seed=4)
    out = tvm.runtime.empty(spec.out_shape, spec.dtype)
    workspace = tvm.runtime.tensor(np.full(want_shape, np.nan, np.float32))  # never read
    lib["main"](*(tvm.runtime.tensor(v) for v in inputs.values()), out, workspace)
    assert_close(out.numpy(), reference_conv(spec, *inputs.values()), spec.dtype)


SPLIT_K_CASES = [  # (template, spec): outputs too small to fill the GPU's 132 SMs
    ("cuda_igemm_f32", dict(input="1x512x7x7", kernel="512x512x3x3", padding=1)),
    ("cuda_igemm_f16_tc", dict(input="1x4x4x64", kernel="64x3x3x64", padding=1,
                               layout="NHWC", dtype="float16", bias=True)),
]


@pytest.mark.parametrize(("template", "flags"), SPLIT_K_CASES, ids=lambda x: str(x)[:16])
def test_small_outputs_split_the_reduction_and_declare_a_workspace(template, flags, tmp_path):
    """C512 7x7 at batch 1: 49 x 512 outputs are 32 tiles for 132 SMs, so the heuristic
    splits the reduction (a batch of 8 at 56x56 is not split); the artifact declares
    the workspace its entries take after `out`, which `convgen.load` allocates."""
    from convgen.compiler.schedule import family
    from convgen.runtime.manifest import Manifest

    target = resolve_target("cuda")
    spec = make_spec(mode="conv", **flags)
    knobs = family(target).template(template).heuristic(spec, target)
    assert knobs is not None and knobs.split_k > 1
    big = make_spec(mode="corr", input="8x64x56x56", kernel="64x64x3x3", padding=1)
    assert family(target).template("cuda_igemm_f32").heuristic(big, target).split_k == 1
    art = build_artifact(spec, target, tmp_path, template=template,
                         knobs=dataclasses.asdict(knobs), verify=False)
    ws = art.manifest.workspace
    assert ws is not None and ws.shape[0] == knobs.split_k and ws.dtype == "float32"
    assert Manifest.read(art.manifest_path).workspace == ws  # the manifest round trip
    assert art.manifest.path_of("module", tmp_path).is_file()  # nvcc compiled both kernels


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_one_output_pixel_avoids_the_gemm_templates(dtype):
    """A GEMM with one row (one output pixel: MobileNetV2's classifier, EfficientNet's
    squeeze-excitation gates) came out wrong from cuda_igemm_f32 on an H200 (the
    register fetches of a one-row tile lose the reduction index); the tensor-core
    template stages its tiles alike. Such 1 x 1 layers run as dlight's GEMV (a warp
    per output channel), a one-pixel window or a reduction of one element as the
    direct kernel; two pixels keep the GEMM."""
    from convgen.compiler.build import lower

    cuda = resolve_target("cuda")
    gemms = {"cuda_igemm_f32", "cuda_igemm_f16_tc"}
    for flags, template in (
            (dict(input="1x1x1", kernel="1x1x1", layout="NWC"), "cuda_direct"),
            (dict(input="1x1x1", kernel="1x1x1", layout="NCW"), "cuda_direct"),
            (dict(input="1x3x3x64", kernel="96x3x3x64", layout="NHWC"), "cuda_direct"),
            (dict(input="1x1x1x64", kernel="96x1x1x64", layout="NHWC"), "cuda_dlight_gemv"),
            (dict(input="1x16x1x1", kernel="4x16x1x1"), "cuda_dlight_gemv")):
        one = make_spec(mode="corr", dtype=dtype, **flags)
        assert lower(one, cuda)[1].name == template, one.name()
    two = make_spec(mode="corr", input="1x1x2x64", kernel="96x1x1x64", layout="NHWC",
                    dtype=dtype)
    assert lower(two, cuda)[1].name in gemms


def test_a_classifier_compiles_as_a_gemv(tmp_path):
    """MobileNetV2's classifier (C1280 -> K1000 on one pixel, in `conv`: its flip is a
    no-op on a 1 x 1 window) through nvcc, both entries: each output channel's sum
    combined across a warp's lanes."""
    spec = make_spec(mode="conv", input="1x1x1x1280", kernel="1000x1x1x1280", layout="NHWC",
                     bias=True, activation="relu")
    art = build_artifact(spec, resolve_target("cuda"), tmp_path, emit_source=True,
                         verify=False)
    assert art.manifest.schedule.name == "cuda_dlight_gemv"
    source = art.manifest.path_of("cuda_source", tmp_path).read_text()
    for entry in ("convgen_main_kernel", "convgen_run_packed_kernel"):
        body = re.search(rf"{entry}\([^)]*\) {{\n(.*?)\n}}\n", source, re.S)
        assert body is not None and "__shfl" in body.group(1), entry  # the warp's reduction
