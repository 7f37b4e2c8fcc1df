"""Loading and calling convgen artifacts: `convgen.load(path)`.

This module and what it imports need only numpy and tvm-ffi (the 3 MB
`apache-tvm-ffi` wheel), never the TVM compiler, so that a deployment or GPU
machine without `apache-tvm` can load, verify and benchmark artifacts built
elsewhere. CPU artifacts call TVM's thread pool (`__TVMBackendParallelLaunch`),
which lives in TVM's runtime library; it is loaded from the installed
apache-tvm package (found without importing it) or from $CONVGEN_TVM_RUNTIME.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convgen.errors import ConvgenError, SpecError, ToolchainError

MANIFEST_SUFFIX = ".json"
# Generated CPU code assumes 64-byte aligned buffers (it emits aligned vector
# loads); numpy only guarantees 16. Misaligned inputs are copied.
ALIGNMENT = 64


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0))


def use_all_cores() -> None:
    """TVM's thread pool starts half the cores on x86 unless told: use them all.
    Must run before the pool starts (the first parallel kernel call)."""
    os.environ.setdefault("TVM_NUM_THREADS", str(available_cores()))


_tvm_runtime_loaded = False


def _load_tvm_runtime() -> None:
    """Make TVM's runtime library (thread pool) visible to CPU artifacts."""
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


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str


def find_manifest(path: str | os.PathLike[str], name: str | None = None) -> Path:
    """A directory, a manifest, or a module file -> the manifest's path."""
    p = Path(path)
    if p.is_dir():
        if name:
            m = p / f"{name}{MANIFEST_SUFFIX}"
            if not m.is_file():
                raise ConvgenError(f"artifact: no kernel named {name!r} in {p}")
            return m
        found = list_manifests(p)
        if len(found) > 1:
            names = ", ".join(q.stem for q in found)
            raise ConvgenError(f"artifact: {p} holds several kernels; name one of: {names}")
        return found[0]
    if p.suffix in (".so", ".onnx") and p.with_suffix(MANIFEST_SUFFIX).is_file():
        return p.with_suffix(MANIFEST_SUFFIX)
    if p.is_file() and _is_manifest(p):
        return p
    raise ConvgenError(f"artifact: {p} is not a convgen artifact directory or manifest")


def list_manifests(path: str | os.PathLike[str]) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        found = sorted(q for q in p.glob(f"*{MANIFEST_SUFFIX}") if _is_manifest(q))
        if not found:
            raise ConvgenError(f"artifact: {p} holds no convgen artifact (no manifest)")
        return found
    return [find_manifest(p)]


def _is_manifest(p: Path) -> bool:
    try:
        return json.loads(p.read_text()).get("format") == "convgen-artifact"
    except (OSError, ValueError, AttributeError):
        return False


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Replace a manifest atomically (a temporary file, then renamed)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConvgenError(f"artifact: cannot read manifest {path}: {err}") from None
    return data


class Kernel:
    """A loaded artifact: call it on numpy arrays (or DLPack tensors on its device).

    `kernel(data, weight[, bias])` returns a new numpy array; pass `out=` to
    write into an existing array or device tensor instead.
    """

    def __init__(self, manifest_path: Path, manifest: dict[str, Any] | None = None) -> None:
        self.manifest_path = manifest_path
        self.manifest = manifest if manifest is not None else read_manifest(manifest_path)
        m = self.manifest
        self.name: str = m["name"]
        self.entry: str = m["entry"]
        self.device: str = "cuda" if m["target"]["kind"] == "cuda" else "cpu"
        self.inputs = [TensorInfo(t["name"], tuple(t["shape"]), t["dtype"]) for t in m["inputs"]]
        self.outputs = [TensorInfo(t["name"], tuple(t["shape"]), t["dtype"]) for t in m["outputs"]]
        self.flops: int = m["flops"]
        self.module_path = manifest_path.parent / m["files"]["module"]
        self._func: Any = None

    def __repr__(self) -> str:
        return f"<convgen.Kernel {self.name} on {self.device}>"

    @property
    def func(self) -> Any:
        """The raw tvm-ffi function: f(data, weight[, bias], out) on device tensors."""
        if self._func is None:
            import tvm_ffi

            if not self.manifest.get("module_compiled", True):
                raise ConvgenError(
                    f"artifact: {self.name} was built with --defer-nvcc and is not compiled "
                    f"yet: run `convgen compile {self.manifest_path.parent}`"
                )
            if self.device == "cpu":
                _load_tvm_runtime()
            try:
                mod = tvm_ffi.load_module(str(self.module_path.resolve()))
                self._func = mod[self.entry]
            except Exception as err:  # tvm-ffi raises its own error types
                raise ToolchainError(f"cannot load {self.module_path}: {err}") from None
        return self._func

    def check_inputs(self, arrays: tuple[Any, ...]) -> None:
        if len(arrays) != len(self.inputs):
            names = ", ".join(t.name for t in self.inputs)
            raise SpecError(
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
        raise SpecError(
            f"{info.name}: shape {'x'.join(map(str, shape)) or '()'} does not match the "
            f"kernel's {'x'.join(map(str, info.shape))}"
        )
    try:
        same = np.dtype(dtype) == np.dtype(info.dtype)
    except TypeError:
        same = False
    if not same:
        raise SpecError(
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
    m = find_manifest(path, name)
    return Kernel(m)
