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
from pathlib import Path
from typing import Any

import numpy as np

from convgen.errors import ArgumentError, ArtifactError, ToolchainError
from convgen.runtime.cores import use_all_cores
from convgen.runtime.manifest import Manifest, TensorInfo, find_manifest

# Generated CPU code assumes 64-byte aligned buffers (it emits aligned vector
# loads); numpy only guarantees 16. Misaligned inputs are copied.
ALIGNMENT = 64

_tvm_runtime_loaded = False


def _load_tvm_runtime() -> None:
    """Make TVM's runtime library (thread pool) visible to CPU artifacts, once."""
    global _tvm_runtime_loaded
    if _tvm_runtime_loaded:
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
            _tvm_runtime_loaded = True
            return
    raise ToolchainError(
        "CPU artifacts need TVM's runtime library (libtvm_runtime.so): install apache-tvm "
        "or point CONVGEN_TVM_RUNTIME at the file"
    )


class Kernel:
    """A loaded artifact: call it on numpy arrays (or DLPack tensors on its device).

    `kernel(data, weight[, bias])` returns a new numpy array; pass `out=` to
    write into an existing array or device tensor instead. Loading checks every
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
        self.module_path = m.path_of("module", self.directory)
        self._func: Any = None

    def __repr__(self) -> str:
        return f"<convgen.Kernel {self.name} on {self.device}>"

    @property
    def func(self) -> Any:
        """The raw tvm-ffi function: f(data, weight[, bias], out) on device tensors."""
        if self._func is None:
            import tvm_ffi

            if not self.manifest.module_compiled:
                raise ArtifactError(
                    f"artifact: {self.name} was built with --defer-nvcc and is not compiled "
                    f"yet: run `convgen compile {self.directory}`"
                )
            if self.device == "cpu":
                _load_tvm_runtime()
            try:
                mod = tvm_ffi.load_module(str(self.module_path.resolve()))
                self._func = mod[self.manifest.entry]
            except Exception as err:  # tvm-ffi raises its own error types
                raise ToolchainError(f"cannot load {self.module_path}: {err}") from None
        return self._func

    def check_inputs(self, arrays: tuple[Any, ...]) -> None:
        if len(arrays) != len(self.inputs):
            names = ", ".join(t.name for t in self.inputs)
            raise ArgumentError(
                f"inputs: {self.name} takes {len(self.inputs)} ({names}), got {len(arrays)}"
            )
        for info, a in zip(self.inputs, arrays):
            _check_tensor(info, a)

    def __call__(self, *arrays: Any, out: Any = None) -> Any:
        self.check_inputs(arrays)
        out_info = self.outputs[0]
        if out is not None:
            _check_tensor(out_info, out)
        if self.device == "cpu":
            args = [host_aligned(a, info.dtype) for a, info in zip(arrays, self.inputs)]
            usable = out is not None and (not isinstance(out, np.ndarray) or _is_aligned(out))
            result = out if usable else aligned_empty(out_info.shape, out_info.dtype)
            self.func(*args, result)
            if out is not None and result is not out:
                np.copyto(out, result)
                return out
            return result
        from convgen.runtime import cuda_driver

        args = [
            a if not isinstance(a, np.ndarray) else cuda_driver.DeviceArray.from_numpy(a)
            for a in arrays
        ]
        dev_out = out if out is not None and not isinstance(out, np.ndarray) else (
            cuda_driver.DeviceArray(out_info.shape, out_info.dtype)
        )
        self.func(*args, dev_out)
        if out is None:
            return dev_out.numpy()
        if isinstance(out, np.ndarray):
            np.copyto(out, dev_out.numpy())
        return out


def _check_tensor(info: TensorInfo, a: Any) -> None:
    shape = tuple(getattr(a, "shape", ()))
    dtype = str(getattr(a, "dtype", ""))
    if shape != info.shape:
        raise ArgumentError(
            f"{info.name}: shape {'x'.join(map(str, shape)) or '()'} does not match the "
            f"kernel's {'x'.join(map(str, info.shape))}"
        )
    try:
        same = np.dtype(dtype) == np.dtype(info.dtype)
    except TypeError:
        same = False
    if not same:
        raise ArgumentError(
            f"{info.name}: dtype {dtype or '?'} does not match the kernel's {info.dtype}"
        )


def _is_aligned(a: Any) -> bool:
    """Usable as is: contiguous, 64-byte aligned, and writable (DLPack cannot
    export read-only numpy arrays)."""
    return (
        isinstance(a, np.ndarray)
        and a.flags.c_contiguous
        and a.flags.writeable
        and a.ctypes.data % ALIGNMENT == 0
    )


def aligned_empty(shape: tuple[int, ...], dtype: str | np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a 64-byte boundary."""
    dt = np.dtype(dtype)
    nbytes = max(1, int(np.prod(shape)) * dt.itemsize)
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    offset = (-raw.ctypes.data) % ALIGNMENT
    return raw[offset : offset + nbytes].view(dt).reshape(shape)


def host_aligned(a: Any, dtype: str) -> Any:
    """numpy arrays of any strides, alignment or writability -> a contiguous,
    64-byte aligned array."""
    if not isinstance(a, np.ndarray):
        return a  # a DLPack tensor: the caller vouches for its layout
    if _is_aligned(a):
        return a
    copy = aligned_empty(a.shape, dtype)
    np.copyto(copy, a)
    return copy


def load(path: str | os.PathLike[str], name: str | None = None) -> Kernel:
    """Load a convgen artifact: a build directory (with `name` when it holds several
    kernels), a manifest (.json), or its module (.so)."""
    return Kernel(find_manifest(path, name))
