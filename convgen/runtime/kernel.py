"""Loading and calling convgen artifacts: `convgen.load(path)`.

Needs only numpy and tvm-ffi (the 3 MB `apache-tvm-ffi` wheel), never the TVM
compiler, so that a deployment or GPU machine without `apache-tvm` can load,
verify and benchmark artifacts built elsewhere. CPU artifacts call TVM's thread
pool (`__TVMBackendParallelLaunch`), which lives in TVM's runtime library; it is
loaded from the installed apache-tvm package (found without importing it) or
from $CONVGEN_TVM_RUNTIME.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from convgen.errors import ArgumentError, ArtifactError, ToolchainError
from convgen.runtime.cores import use_all_cores
from convgen.runtime.manifest import Manifest, TensorInfo, find_manifest

CACHE_LINE = 64
KDL_CPU = 1  # DLPack's device type of host memory
_tvm_runtime: Path | None = None  # TVM's runtime library, once loaded
_tvm_runtime_cuda = False


def load_tvm_runtime() -> None:
    """Make TVM's runtime library (thread pool, Relax VM) visible to CPU artifacts and
    deployed models, once."""
    global _tvm_runtime
    if _tvm_runtime is not None:
        return
    import tvm_ffi  # noqa: F401  (loads libtvm_ffi.so, which the runtime links to)

    use_all_cores()
    candidates = []
    if os.environ.get("CONVGEN_TVM_RUNTIME"):
        candidates.append(Path(os.environ["CONVGEN_TVM_RUNTIME"]))
    spec = importlib.util.find_spec("tvm")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append(Path(loc) / "lib" / "libtvm_runtime.so")
    for path in candidates:
        if path.is_file():
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            _tvm_runtime = path
            return
    raise ToolchainError(
        "CPU artifacts and deployed models need TVM's runtime library (libtvm_runtime.so): "
        "install apache-tvm or point CONVGEN_TVM_RUNTIME at the file"
    )


def load_tvm_runtime_cuda() -> None:
    """TVM's CUDA runtime (libtvm_runtime_cuda.so, beside libtvm_runtime.so): what a
    deployed CUDA model's module needs to load its GPU code and to allocate device
    memory. It links the NVIDIA driver and the CUDA runtime (libcudart)."""
    global _tvm_runtime_cuda
    if _tvm_runtime_cuda:
        return
    load_tvm_runtime()
    assert _tvm_runtime is not None
    path = _tvm_runtime.with_name("libtvm_runtime_cuda.so")
    try:
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as err:
        raise ToolchainError(f"CUDA models need TVM's CUDA runtime ({path.name}), the NVIDIA "
                             f"driver and libcudart: {err}") from None
    _tvm_runtime_cuda = True


class Kernel:
    """A loaded artifact: call it on numpy arrays (or DLPack tensors on its device).

    `kernel(data, weight[, bias][, residual])` returns a numpy array (a CUDA kernel
    called on device tensors alone returns a device array); pass `out=` to write
    into an existing array or device tensor instead. For constant weights,
    `kernel.bind(weight[, bias])` packs them once and returns a callable of the
    data (and the residual, where the kernel adds one). Loading checks every
    file of the artifact against the sizes and hashes in its manifest.
    """

    def __init__(self, manifest_path: Path, manifest: Manifest | None = None) -> None:
        self.manifest_path = manifest_path
        self.directory = manifest_path.parent
        self.manifest = manifest if manifest is not None else Manifest.read(manifest_path)
        self.manifest.check_files(self.directory)
        m = self.manifest
        self.spec = m.spec
        self.name = m.name
        self.device = m.target.device
        self.inputs: list[TensorInfo] = m.inputs
        self.outputs: list[TensorInfo] = m.outputs
        self.flops = m.flops
        self.alignment = m.arg_alignment
        self.module_path = m.path_of("module", self.directory)
        self._func: Any = None
        self._module: Any = None
        self._outputs: list[np.ndarray] = []  # the last arrays returned (see _output)
        self._outputs_lock = threading.Lock()
        self._in_specs = [(t.shape, np.dtype(t.dtype)) for t in self.inputs]
        self._out_spec = (self.outputs[0].shape, np.dtype(self.outputs[0].dtype))
        self._scratch: tuple[Any, ...] | None = None

    def __repr__(self) -> str:
        return f"<convgen.Kernel {self.name} on {self.device}>"

    @property
    def func(self) -> Any:
        """The raw tvm-ffi function: f(data, weight[, bias][, residual], out, *scratch)
        on device tensors."""
        if self._func is None:
            import tvm_ffi

            if not self.manifest.module_compiled:
                raise ArtifactError(
                    f"artifact: {self.name} was built with --defer-nvcc and is not compiled "
                    f"yet: run `convgen compile {self.directory}`"
                )
            if self.device == "cpu":
                load_tvm_runtime()
            try:
                self._module = tvm_ffi.load_module(str(self.module_path.resolve()))
                self._func = self._module[self.manifest.entry]
            except Exception as err:  # tvm-ffi raises its own error types
                raise ToolchainError(f"cannot load {self.module_path}: {err}") from None
        return self._func

    @property
    def scratch(self) -> tuple[Any, ...]:
        """What the entries take after `out`: the manifest's workspace, allocated on the
        kernel's device at the first call and reused by every call (the kernel does not
        keep anything in it between calls; calls on one CUDA stream run in order), or
        nothing."""
        if self._scratch is None:
            ws = self.manifest.workspace
            if ws is None:
                self._scratch = ()
            elif self.device == "cpu":
                self._scratch = (aligned_empty(ws.shape, ws.dtype, CACHE_LINE),)
            else:
                from convgen.runtime import cuda_driver

                self._scratch = (cuda_driver.ffi_tensor(
                    cuda_driver.DeviceArray(ws.shape, ws.dtype)),)
        return self._scratch

    def check_inputs(self, arrays: tuple[Any, ...]) -> None:
        if len(arrays) != len(self.inputs):
            names = ", ".join(t.name for t in self.inputs)
            raise ArgumentError(
                f"inputs: {self.name} takes {len(self.inputs)} ({names}), got {len(arrays)}"
            )
        for info, a in zip(self.inputs, arrays):
            check_tensor(info, a)

    def __call__(self, *arrays: Any, out: Any = None) -> Any:
        if self.device != "cpu":
            self.check_inputs(arrays)
            return self._call_cuda(self.func, arrays, out, arrays)
        # The common case first, at the cost of a few attribute reads: numpy arrays of
        # the right shape and dtype that the kernel can read in place.
        args = arrays
        if not self._in_place(arrays):
            self.check_inputs(arrays)
            args = tuple(host_usable(a, info.dtype, self.alignment)
                         for a, info in zip(arrays, self.inputs))
        return self._run(self.func, args, out)

    def bind(self, weight: Any, bias: Any = None) -> BoundKernel:
        """The kernel with constant weights (and bias): a callable of the data (and the
        residual, where the spec adds one): `bound(data[, residual])`.

        Where the module has packed entries (every artifact but a MetaSchedule trace's)
        the weights are packed once here, on the kernel's device, into the layout the
        schedule reads with `conv`'s flip applied, and every call runs on them;
        elsewhere the bound kernel keeps its own copy of the weights (on the GPU for
        CUDA artifacts) and calls the plain entry. numpy arrays are copied, so later
        changes to them do not reach a bound kernel (bind again); device tensors
        (DLPack) are held as given (but packed: a copy)."""
        consts = (weight,) if bias is None else (weight, bias)
        if (bias is None) == self.spec.bias:
            want = "weight and bias" if self.spec.bias else "weight only (no bias)"
            raise ArgumentError(f"bind: {self.name} takes {want}")
        infos = self.inputs[1 : 1 + len(consts)]
        for info, a in zip(infos, consts):
            check_tensor(info, a)
        packed = self.manifest.packed_weights
        if self.device != "cpu":
            from convgen.runtime import cuda_driver

            # the copies this bound kernel owns are passed to every call as tvm-ffi
            # tensors made once (`cuda_driver.ffi_tensor`), a caller's tensors as given
            held = tuple(a if not isinstance(a, np.ndarray) else cuda_driver.ffi_tensor(
                cuda_driver.DeviceArray.from_numpy(np.ascontiguousarray(a))) for a in consts)
            if packed is None:
                return BoundKernel(self, self.func, held)
            p = cuda_driver.DeviceArray(packed.packed.shape, packed.packed.dtype)
            self.entry(packed.pack_entry)(held[0], p)
            cuda_driver.synchronize()  # before the uploaded weight may be freed
            return BoundKernel(self, self.entry(packed.run_entry),
                               (cuda_driver.ffi_tensor(p), *held[1:]))
        copies = tuple(_owned_copy(a, info.dtype) for a, info in zip(consts, infos))
        if packed is None:
            return BoundKernel(self, self.func, copies)
        p = aligned_empty(packed.packed.shape, packed.packed.dtype, CACHE_LINE)
        self.entry(packed.pack_entry)(copies[0], p)
        return BoundKernel(self, self.entry(packed.run_entry), (p, *copies[1:]))

    def entry(self, name: str) -> Any:
        """Another entry function of the module (the packing and run-packed entries)."""
        self.func  # noqa: B018  (loads the module, with its checks)
        try:
            return self._module[name]
        except Exception:  # tvm-ffi raises its own error types
            raise ArtifactError(f"artifact: {self.module_path} has no entry {name!r}") from None

    def _run(self, func: Any, args: tuple[Any, ...], out: Any) -> Any:
        """func(*args, result) on host arrays the kernel takes as they are, into `out`
        or an array of the kernel's output pool."""
        if out is None:
            result = self._output()
        elif type(out) is np.ndarray and (out.shape, out.dtype) == self._out_spec:
            result = out if _is_usable(out, self.alignment) else aligned_empty(
                out.shape, out.dtype, self.alignment)
        else:
            check_tensor(self.outputs[0], out)
            usable = not isinstance(out, np.ndarray) or _is_usable(out, self.alignment)
            result = out if usable else aligned_empty(out.shape, out.dtype, self.alignment)
        if out is not None and any(type(a) is np.ndarray and np.may_share_memory(a, result)
                                   for a in args):
            # `out` over an input (k(x, w, out=x)): the kernel would read inputs it has
            # already overwritten, so it writes elsewhere and the result is copied
            # (numpy's ufuncs buffer overlapping calls the same way)
            result = aligned_empty(result.shape, result.dtype, self.alignment)
        func(*args, result, *self.scratch)
        if out is not None and result is not out:
            np.copyto(out, result)
            return out
        return result

    def _in_place(self, arrays: tuple[Any, ...]) -> bool:
        """Every input a numpy array of the kernel's shape and dtype, readable in place."""
        if len(arrays) != len(self._in_specs):
            return False
        for a, (shape, dtype) in zip(arrays, self._in_specs):
            if type(a) is not np.ndarray or a.shape != shape or a.dtype != dtype:
                return False
            if not _is_usable(a, self.alignment):
                return False
        return True

    def _output(self) -> np.ndarray:
        """A fresh output array for the caller. A new allocation of this size comes from
        the OS page by page (glibc maps large blocks afresh), and the kernel then pays
        a page fault per 4 KiB on its first write, a tenth of a small layer's time. So
        the kernel keeps the last two arrays it returned and hands one out again once
        the caller holds no reference to it (nor to a view of it): in `y = k(x)` in a
        loop, the array before last. (A lock keeps two threads from taking the same one.)"""
        with self._outputs_lock:
            for i in range(len(self._outputs)):
                if _released(self._outputs[i]):
                    a = self._outputs.pop(i)
                    self._outputs.append(a)
                    return a
            # 64-byte aligned although the kernel would take less: vector stores that
            # straddle cache lines cost a second store on Intel cores before Ice Lake
            shape, dtype = self.outputs[0].shape, self.outputs[0].dtype
            a = aligned_empty(shape, dtype, CACHE_LINE)
            self._outputs = [*self._outputs[-1:], a]
            return a

    def _call_cuda(self, func: Any, arrays: tuple[Any, ...], out: Any,
                   per_call: tuple[Any, ...]) -> Any:
        """func(*arrays, out) on the GPU: numpy inputs copied there. The result comes back
        as numpy where any of the call's own inputs (`per_call`) was numpy; where all
        were device tensors it stays on the device, a `cuda_driver.DeviceArray` (DLPack:
        `torch.from_dlpack(y)`), as PyTorch's functions return device tensors."""
        from convgen.runtime import cuda_driver

        out_info = self.outputs[0]
        if out is not None:
            check_tensor(out_info, out)
            if not isinstance(out, np.ndarray) and any(out is a for a in arrays):
                raise ArgumentError("out: on the GPU the output must not be one of the "
                                    "inputs (the kernel would read what it overwrote)")
        args = [
            a if not isinstance(a, np.ndarray) else cuda_driver.DeviceArray.from_numpy(a)
            for a in arrays
        ]
        dev_out = out if out is not None and not isinstance(out, np.ndarray) else (
            cuda_driver.DeviceArray(out_info.shape, out_info.dtype)
        )
        func(*args, dev_out, *self.scratch)
        if out is None:
            on_host = any(isinstance(a, np.ndarray) for a in per_call)
            return dev_out.numpy() if on_host else dev_out
        if isinstance(out, np.ndarray):
            np.copyto(out, dev_out.numpy())
        return out


class BoundKernel:
    """A kernel with its weights bound (`Kernel.bind`): `bound(data[, residual][, out=])`.

    `func` is the raw entry it calls and `constants` the arguments it passes after
    the data (packed weights[, bias]): `func(data, *constants[, residual], out)`."""

    def __init__(self, kernel: Kernel, func: Any, constants: tuple[Any, ...]) -> None:
        self.kernel = kernel
        self.func = func
        self.constants = constants
        self._data_spec = kernel._in_specs[0]
        # the per-call inputs after the data (the residual), as the entry takes them
        self._rest = kernel.inputs[1 + len(constants):]

    def __repr__(self) -> str:
        return f"<convgen.BoundKernel {self.kernel.name} on {self.kernel.device}>"

    def __call__(self, data: Any, *rest: Any, out: Any = None) -> Any:
        k = self.kernel
        if len(rest) != len(self._rest):
            names = ", ".join(t.name for t in (k.inputs[0], *self._rest))
            raise ArgumentError(f"inputs: bound {k.name} takes {len(self._rest) + 1} "
                                f"({names}), got {len(rest) + 1}")
        if k.device != "cpu":
            for info, a in zip((k.inputs[0], *self._rest), (data, *rest)):
                check_tensor(info, a)
            return k._call_cuda(self.func, (data, *self.constants, *rest), out, (data, *rest))
        if not (type(data) is np.ndarray and (data.shape, data.dtype) == self._data_spec
                and _is_usable(data, k.alignment)):
            check_tensor(k.inputs[0], data)
            data = host_usable(data, k.inputs[0].dtype, k.alignment)
        for info, a in zip(self._rest, rest):
            check_tensor(info, a)
        rest = tuple(host_usable(a, info.dtype, k.alignment)
                     for info, a in zip(self._rest, rest))
        return k._run(self.func, (data, *self.constants, *rest), out)


def _released(a: np.ndarray) -> bool:
    """Nothing outside the kernel's list refers to `a` or to a view of it. A view's
    `base` is the array that owns the memory (numpy skips intermediate views), so both
    `a` and its owner are counted."""
    if sys.getrefcount(a) != 3:  # the list, the parameter, getrefcount's argument
        return False
    owner = a.base
    return owner is None or sys.getrefcount(owner) == 3  # a.base, `owner`, the argument


def _address(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


def check_tensor(info: TensorInfo, a: Any) -> None:
    if not hasattr(a, "shape"):
        raise ArgumentError(f"{info.name}: expected an array (numpy, or a DLPack tensor), "
                            f"got {type(a).__name__}")
    shape = tuple(a.shape)
    dtype = str(getattr(a, "dtype", "")).removeprefix("torch.")  # (torch.float32)
    if shape != info.shape:
        raise ArgumentError(
            f"{info.name}: shape {'x'.join(map(str, shape)) or '()'} does not match the "
            f"expected {'x'.join(map(str, info.shape)) or '()'}"
        )
    try:
        same = np.dtype(dtype) == np.dtype(info.dtype)
    except TypeError:
        same = False
    if not same:
        raise ArgumentError(
            f"{info.name}: dtype {dtype or '?'} does not match the expected {info.dtype}"
        )


def _is_usable(a: np.ndarray, alignment: int) -> bool:
    """Readable in place by the kernel: C-contiguous, aligned as the module declares
    (numpy's own `aligned` flag is the element's alignment) and writable (DLPack
    cannot export read-only numpy arrays)."""
    f = a.flags
    if not (f.c_contiguous and f.writeable and f.aligned):
        return False
    return alignment <= a.itemsize or _address(a) % alignment == 0


def aligned_empty(shape: tuple[int, ...], dtype: str | np.dtype, alignment: int = 64,
                  offset: int = 0) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts `offset` bytes past an
    `alignment` boundary (a plain np.empty where numpy's own alignment suffices)."""
    dt = np.dtype(dtype)
    if alignment <= 16 and not offset:  # numpy aligns every allocation to 16 bytes
        return np.empty(shape, dt)
    nbytes = max(1, int(np.prod(shape)) * dt.itemsize)
    raw = np.empty(nbytes + alignment + offset, np.uint8)
    start = (-_address(raw)) % alignment + offset
    return raw[start : start + nbytes].view(dt).reshape(shape)


NUMPY_PLACEMENT = 16
"""Bytes past a cache line at which numpy starts most of the arrays it allocates (16 or
48 for arrays of 1 KB to 3 MB, 2026-12-03): where a caller's data usually lies when a
kernel takes it in place. Vector loads along it straddle two lines every other time
(32-byte vectors) or every time (64-byte ones); see `tuning.grid`."""


def _aligned_copy(a: np.ndarray, dtype: str, alignment: int) -> np.ndarray:
    copy = aligned_empty(a.shape, dtype, alignment)
    np.copyto(copy, a)
    return copy


def _owned_copy(a: Any, dtype: str) -> Any:
    """A 64-byte aligned copy of a numpy array that the caller cannot change (a DLPack
    tensor is kept as it is: the caller vouches for it)."""
    return _aligned_copy(a, dtype, CACHE_LINE) if isinstance(a, np.ndarray) else a


def host_usable(a: Any, dtype: str, alignment: int = 64) -> Any:
    """numpy arrays of any strides, alignment or writability -> one the kernel takes
    as is: the array itself when it already is, else a contiguous aligned copy. A
    tensor of another library in CPU memory (torch's: DLPack) is taken as numpy's
    view of it, so a strided one is copied too; a device tensor is passed as it is
    (TVM checks its device, shape and strides), never copied to the host here."""
    if not isinstance(a, np.ndarray):
        device = getattr(a, "__dlpack_device__", None)
        if device is None or device()[0] != KDL_CPU:
            return a
        try:
            a = np.from_dlpack(a)
        except (BufferError, RuntimeError, TypeError, ValueError):
            return a  # (a dtype numpy lacks: bfloat16)
    return a if _is_usable(a, alignment) else _aligned_copy(a, dtype, alignment)


def load(path: str | os.PathLike[str], name: str | None = None) -> Any:
    """Load a convgen artifact: a build directory (with `name` when it holds several
    kernels), a manifest (.json), or its module (.so) -> a `Kernel`; a `convgen deploy`
    directory (or its manifest) -> a `Model`."""
    from convgen.runtime.manifest import find_model_manifest

    model = find_model_manifest(path) if name is None else None
    if model is not None:
        from convgen.runtime.model import Model

        return Model(model)
    return Kernel(find_manifest(path, name))
