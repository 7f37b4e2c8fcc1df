"""convgen.load: any contiguity/alignment, clear errors, no TVM compiler needed."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import subprocess
import sys
import weakref

import numpy as np
import pytest
from helpers import assert_close, random_case

import convgen
from convgen.compiler.build import build_artifact
from convgen.errors import ArgumentError, ArtifactError, ConvgenError
from convgen.reference import reference_conv
from convgen.spec import make_spec

SPEC = make_spec(mode="conv", input="1x8x10x10", kernel="16x8x3x3", padding=1, bias=True)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, cpu_target):
    out = tmp_path_factory.mktemp("art")
    build_artifact(SPEC, cpu_target, out, verify=False)
    return out


def test_load_and_call(artifact):
    k = convgen.load(artifact)
    inputs = random_case(SPEC, 0)
    assert_close(k(*inputs.values()), reference_conv(SPEC, *inputs.values()), "float32")
    assert k.name == SPEC.name() and k.device == "cpu"


def test_any_layout_of_memory(artifact):
    """Fortran order, strided views, misaligned and read-only buffers all work."""
    k = convgen.load(artifact / f"{SPEC.name()}.json")
    inputs = random_case(SPEC, 1)
    want = reference_conv(SPEC, *inputs.values())
    x, w, b = inputs.values()
    fortran = np.asfortranarray(x)
    strided = np.repeat(x, 2, axis=-1)[..., ::2]
    raw = np.empty(x.nbytes + 4, np.uint8)
    misaligned = raw[4:].view(np.float32).reshape(x.shape)
    misaligned[...] = x
    readonly = x.copy()
    readonly.flags.writeable = False
    for data in (fortran, strided, misaligned, readonly):
        assert_close(k(data, w, b), want, "float32")
        assert_close(k.bind(w, b)(data), want, "float32")
    # the weights bind from any layout of memory too
    for weight in (np.asfortranarray(w), np.repeat(w, 2, axis=0)[::2], _read_only(w)):
        assert_close(k.bind(weight, _read_only(b))(x), want, "float32")
    out = np.empty(SPEC.out_shape, np.float32)
    assert k(x, w, b, out=out) is out
    assert_close(out, want, "float32")


def _read_only(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flags.writeable = False
    return a


def test_bound_kernel(tmp_path, cpu_target):
    """bind packs the weights once, here for cpu_kvec (output channels blocked by the
    vector): the bound call equals the unbound one, and later changes to the caller's
    weights do not reach it."""
    art = build_artifact(SPEC, cpu_target, tmp_path, verify=False, template="cpu_kvec",
                         knobs={"lanes": 8, "nkv": 2, "pw": 5})
    k = convgen.load(art.manifest_path)
    packed = k.manifest.packed_weights
    assert packed is not None and packed.packed.shape == (2, 8, 3, 3, 8)
    x, w, b = random_case(SPEC, 3).values()
    bound = k.bind(w, b)
    assert bound.constants[0].shape == packed.packed.shape
    want = reference_conv(SPEC, x, w, b)
    assert_close(bound(x), k(x, w, b), "float32")
    w[...] = 0
    b[...] = 0
    assert_close(bound(x), want, "float32")
    out = np.empty(SPEC.out_shape, np.float32)
    assert bound(x, out=out) is out
    assert_close(out, want, "float32")


def test_out_may_be_one_of_the_inputs(tmp_path, cpu_target):
    """k(x, w, r, out=x), as numpy's ufuncs allow: the result is what it would be
    into a fresh array (the kernel writes elsewhere and it is copied), not a
    convolution of values it has already overwritten."""
    spec = make_spec(mode="conv", input="1x8x6x6", kernel="8x8x3x3", padding=1,
                     residual=True, activation="relu")
    art = build_artifact(spec, cpu_target, tmp_path, verify=False)
    k = convgen.load(art.manifest_path)
    x, w, r = random_case(spec, 4).values()
    want = reference_conv(spec, x, w, r)
    for unbound in (True, False):
        for over in ("data", "residual"):
            data, residual = x.copy(), r.copy()
            out = data if over == "data" else residual
            got = (k(data, w, residual, out=out) if unbound
                   else k.bind(w)(data, residual, out=out))
            assert got is out
            assert_close(out, want, "float32")


def test_bound_kernel_takes_the_residual_per_call(tmp_path, cpu_target):
    """With a fused residual the bound kernel takes (data, residual): the weights are
    constant, the shortcut is not."""
    spec = dataclasses.replace(SPEC, residual=True, activation="relu")
    art = build_artifact(spec, cpu_target, tmp_path, verify=False)
    k = convgen.load(art.manifest_path)
    x, w, b, r = random_case(spec, 4).values()
    bound = k.bind(w, b)
    want = reference_conv(spec, x, w, b, r)
    assert (want == 0).any() and (want > 0).any()  # the ReLU clips some, not all
    assert_close(bound(x, r), want, "float32")
    assert_close(bound(x, r[:, ::-1].copy()[:, ::-1]), want, "float32")  # any strides
    with pytest.raises(ArgumentError, match=r"^inputs: bound .* takes 2 \(data, residual\)"):
        bound(x)
    with pytest.raises(ArgumentError, match=r"^residual: shape"):
        bound(x, r[..., :2])


def test_bind_errors_name_the_field(artifact):
    k = convgen.load(artifact)
    x, w, b = random_case(SPEC, 0).values()
    with pytest.raises(ArgumentError, match=r"^bind: .* takes weight and bias"):
        k.bind(w)
    with pytest.raises(ArgumentError, match=r"^weight: shape 16x8x3x2"):
        k.bind(w[..., :2], b)
    with pytest.raises(ArgumentError, match=r"^bias: dtype float64"):
        k.bind(w, b.astype(np.float64))
    with pytest.raises(ArgumentError, match=r"^data: shape"):
        k.bind(w, b)(x[:, :4])


def test_numpy_arrays_are_used_without_a_copy(artifact, monkeypatch):
    """The kernel declares its arguments element-aligned, so any C-contiguous writable
    array numpy gives (16-byte aligned, or here only 4) goes to it as it is."""
    k = convgen.load(artifact)
    assert k.alignment == 4
    inputs = random_case(SPEC, 5)
    want = reference_conv(SPEC, *inputs.values())
    shifted = []
    for a in inputs.values():
        raw = np.empty(a.nbytes + 64, np.uint8)
        start = (-raw.ctypes.data) % 64 + 4  # 4 bytes past a 64-byte boundary
        b = raw[start : start + a.nbytes].view(np.float32).reshape(a.shape)
        b[...] = a
        shifted.append(b)

    def no_copy(*args, **kwargs):
        raise AssertionError("an input or the output was copied")

    bound = k.bind(*shifted[1:])
    monkeypatch.setattr(np, "copyto", no_copy)
    out = np.empty(SPEC.out_shape, np.float32)
    assert k(*shifted, out=out) is out
    bound_out = np.empty(SPEC.out_shape, np.float32)
    assert bound(shifted[0], out=bound_out) is bound_out
    monkeypatch.undo()
    assert_close(out, want, "float32")
    assert_close(bound_out, want, "float32")


def test_returned_arrays_are_never_overwritten_while_held(artifact):
    """The kernel recycles an output array only once nothing refers to it: arrays the
    caller keeps, and views of them, keep their values across later calls."""
    k = convgen.load(artifact)
    cases = [random_case(SPEC, seed) for seed in (10, 11, 12, 13)]
    wants = [reference_conv(SPEC, *c.values()) for c in cases]
    held = k(*cases[0].values())
    view = k(*cases[1].values())[0, :2]  # only a view of the second result is kept
    for c in cases[2:] * 3:
        k(*c.values())
    assert_close(held, wants[0], "float32")
    assert_close(view, wants[1][0, :2], "float32")
    first = weakref.ref(k(*cases[2].values()))
    assert first() is not None  # dropped by the caller, kept by the kernel
    assert all(k(*cases[2].values()) is first() for _ in range(3))  # and handed out again


def test_wrong_inputs_name_the_field(artifact):
    k = convgen.load(artifact)
    x, w, b = random_case(SPEC, 0).values()
    with pytest.raises(ArgumentError, match=r"^data: shape"):
        k(x[:, :4], w, b)
    with pytest.raises(ArgumentError, match=r"^weight: dtype float64"):
        k(x, w.astype(np.float64), b)
    with pytest.raises(ArgumentError, match=r"^inputs:"):
        k(x, w)


def test_load_errors(tmp_path, cpu_target):
    with pytest.raises(ConvgenError, match="no convgen artifact"):
        convgen.load(tmp_path)
    small = make_spec(mode="corr", input="1x1x5x5", kernel="1x1x3x3")
    for spec in (SPEC, small):
        build_artifact(spec, cpu_target, tmp_path, verify=False)
    with pytest.raises(ConvgenError, match="several kernels"):
        convgen.load(tmp_path)
    assert convgen.load(tmp_path, small.name()).name == small.name()


def test_runtime_side_never_imports_the_compiler(artifact):
    """load + call, verify, bench and the GPU side of tuning, on an existing artifact,
    import numpy, tvm-ffi, onnx and onnxruntime only; `tvm` (the 100 MB compiler
    package) stays out (tests/test_boundaries.py checks the imports statically)."""
    code = f"""
import sys, numpy as np
import convgen
import convgen.tuning.measure
from convgen.runtime.bench import bench_kernels
from convgen.runtime.verify import verify_artifact
k = convgen.load({str(artifact)!r}, {SPEC.name()!r})
x = np.ones(k.inputs[0].shape, np.float32)
w = np.ones(k.inputs[1].shape, np.float32)
b = np.ones(k.inputs[2].shape, np.float32)
k(x, w, b)
[(name, report)] = [r for r in verify_artifact({str(artifact)!r}, update=False)
                    if r[0] == {SPEC.name()!r}]
assert report.passed, report.lines()
[row] = bench_kernels([k], repeats=2, warmup=1, min_sample_ms=1, peers=("onnxruntime",))
assert row.times["convgen"].median > 0 and row.times["onnxruntime"].median > 0
bad = sorted(m for m in sys.modules if m == "tvm" or m.startswith("tvm."))
print("compiler modules:", bad)
sys.exit(1 if bad else 0)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_bench_takes_the_peak_of_the_kernels_vector_width(artifact, monkeypatch):
    """`% of peak` is against the FMA peak of the code's own vectors (AVX2 code on an
    AVX-512 machine: the 256-bit peak), read from the artifact's target record."""
    from convgen.runtime import bench

    asked: list[tuple[int, int]] = []
    monkeypatch.setattr(bench, "measure_cpu_peak",
                        lambda n, bits: asked.append((n, bits)) or 100.0)
    k = convgen.load(artifact, SPEC.name())
    [row] = bench.bench_kernels([k], repeats=1, warmup=0, min_sample_ms=0, peers=())
    assert [bits for _, bits in asked] == [k.manifest.target.vector_bits]
    assert row.peak_gflops == 100.0


def test_damaged_module_is_one_clear_error(artifact, tmp_path):
    """A .so cut short by a failed copy would crash the process with a bus error when
    opened: loading checks its size and hash against the manifest first."""
    import shutil

    from click.testing import CliRunner

    from convgen.cli import main

    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    so = copy / f"{SPEC.name()}.so"
    so.write_bytes(so.read_bytes()[: so.stat().st_size // 2])
    with pytest.raises(ArtifactError, match=rf"{SPEC.name()}\.so is damaged"):
        convgen.load(copy)
    for command in (["verify", str(copy)], ["bench", str(copy), "--no-peers", "--repeats", "1"]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 2, result.output
        assert result.output.startswith("Error: artifact:") and "is damaged" in result.output
        assert result.output.count("\n") == 1  # one line, no traceback
    # same size, other bytes: the hash catches it
    shutil.copy(artifact / so.name, so)
    data = bytearray(so.read_bytes())
    data[len(data) // 2] ^= 0xFF
    so.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="SHA-256"):
        convgen.load(copy)


def _copy_with_manifest(artifact, tmp_path, edit):
    """A copy of the artifact whose manifest `edit(dict)` has changed."""
    import json
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    path = copy / f"{SPEC.name()}.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return copy


def test_manifest_from_a_newer_convgen_is_refused(artifact, tmp_path):
    copy = _copy_with_manifest(artifact, tmp_path, lambda d: d.update(format_version=99))
    with pytest.raises(ArtifactError, match=r"newer convgen .*upgrade convgen"):
        convgen.load(copy)


def test_format_1_manifest_still_loads(artifact, tmp_path):
    """Artifacts written before files carried sizes and hashes load as before."""

    def as_format_1(data):
        data["format_version"] = 1
        data["files"] = {role: f["name"] for role, f in data["files"].items()}
        data["schedule"]["kind"] = "template"

    k = convgen.load(_copy_with_manifest(artifact, tmp_path, as_format_1))
    inputs = random_case(SPEC, 4)
    assert_close(k(*inputs.values()), reference_conv(SPEC, *inputs.values()), "float32")
    assert k.manifest.schedule.kind == "heuristic"


def test_uses_every_core_by_default():
    code = ("import os, convgen.runtime.cores as r; r.use_all_cores(); "
            "print(os.environ['TVM_NUM_THREADS'])")
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert int(out.stdout) == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("offset", [0, 16, 48])
@pytest.mark.parametrize("shape", [(3,), (2, 5, 7)])
def test_aligned_empty_starts_where_asked(shape, offset):
    from convgen.runtime.kernel import CACHE_LINE, aligned_empty

    a = aligned_empty(shape, "float32", CACHE_LINE, offset=offset)
    assert a.shape == shape and a.flags.c_contiguous and a.flags.writeable
    assert a.__array_interface__["data"][0] % CACHE_LINE == offset


def test_tvm_ffi_tensors_in_and_out(artifact):
    """DLPack tensors (here tvm-ffi's own) go straight to the kernel, `out` included."""
    import tvm_ffi

    from convgen.runtime.kernel import aligned_empty

    k = convgen.load(artifact)
    inputs = random_case(SPEC, 2)
    aligned = []
    for a in inputs.values():
        buf = aligned_empty(a.shape, a.dtype)
        buf[...] = a
        aligned.append(buf)
    out_np = aligned_empty(SPEC.out_shape, "float32")
    out = tvm_ffi.from_dlpack(out_np)
    assert k(*(tvm_ffi.from_dlpack(a) for a in aligned), out=out) is out
    assert_close(out_np, reference_conv(SPEC, *inputs.values()), "float32")


def test_strided_tensors_of_other_libraries_are_read_as_numpy_reads_them(artifact):
    """A CPU tensor of another library that is not compact (a transposed view, as
    tvm-ffi or torch give it) is copied like a strided numpy array, rather than
    refused by TVM's argument check; torch's dtypes ("torch.float32") are named as
    numpy names them."""
    import tvm_ffi

    k = convgen.load(artifact)
    inputs = random_case(SPEC, 3)
    data = inputs["data"]
    strided = np.ascontiguousarray(np.swapaxes(data, -1, -2)).swapaxes(-1, -2)
    args = [tvm_ffi.from_dlpack(strided), *(inputs[n] for n in list(inputs)[1:])]
    assert_close(k(*args), reference_conv(SPEC, *inputs.values()), "float32")
    torch = pytest.importorskip("torch", reason="torch is an optional extra")
    tensors = [torch.from_numpy(a) for a in inputs.values()]
    tensors[0] = torch.from_numpy(strided)
    assert_close(k(*tensors), reference_conv(SPEC, *inputs.values()), "float32")


class _HostExport:
    """Host memory exported through `cuda_driver.export_dlpack` as a kDLCPU tensor: the
    DeviceArray's DLPack path, checked without a GPU."""

    def __init__(self) -> None:
        self.a = np.arange(6, dtype=np.float32)
        self.shape_c = (ctypes.c_int64 * 1)(6)

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)

    def __dlpack__(self, **_kwargs: object) -> object:
        from convgen.runtime import cuda_driver

        return cuda_driver.export_dlpack(self, self.a.ctypes.data, (1, 0), self.shape_c, 1,
                                         self.a.dtype)


def test_a_dlpack_export_keeps_its_memory_alive_until_the_consumer_is_done():
    """`torch.from_dlpack(k(x_dev))` must stay valid after the kernel's result is dropped
    (its memory would otherwise go back to the cache for the next call), and an export
    must not leak once its consumer is done, nor when nobody consumed it."""
    import gc

    owner = _HostExport()
    alive = weakref.ref(owner)
    view = np.from_dlpack(owner)
    del owner
    gc.collect()
    assert alive() is not None and view.tolist() == list(range(6))
    del view
    gc.collect()
    assert alive() is None
    owner = _HostExport()
    alive = weakref.ref(owner)
    capsule = owner.__dlpack__()
    del owner
    gc.collect()
    assert alive() is not None
    del capsule
    gc.collect()
    assert alive() is None


def test_a_tensor_made_once_for_every_call_holds_its_memory_until_dropped():
    """A bound CUDA kernel passes its weights and workspace as tvm-ffi tensors made once
    (`cuda_driver.ffi_tensor`): each such tensor reads the array's memory, keeps the
    array alive while the bound kernel holds it, and releases it when dropped."""
    import gc

    from convgen.runtime import cuda_driver

    owner = _HostExport()
    alive = weakref.ref(owner)
    tensor = cuda_driver.ffi_tensor(owner)  # type: ignore[arg-type]  (a stand-in)
    del owner
    gc.collect()
    assert alive() is not None
    assert tuple(tensor.shape) == (6,) and np.from_dlpack(tensor).tolist() == list(range(6))
    del tensor
    gc.collect()
    assert alive() is None
