"""Loading and calling deployed models (`convgen deploy`): `convgen.load(DIR)`.

A deployed model is a Relax VM executable in one shared library. Like single
kernels it needs tvm-ffi and TVM's runtime library (the VM, the thread pool),
never the TVM compiler: the library is opened with `tvm_ffi.load_module`, its
`vm_load_executable` gives the VM, and `vm_initialization` readies it on the CPU
(a CUDA model: on the GPU, with the CPU for shape computations, which needs TVM's
CUDA runtime library too).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from convgen.errors import ArgumentError, ToolchainError
from convgen.runtime.kernel import (
    KDL_CPU,
    check_tensor,
    host_usable,
    load_tvm_runtime,
    load_tvm_runtime_cuda,
)
from convgen.runtime.manifest import ModelManifest, TensorInfo

# the VM's device and allocator codes (DLPack's kDLCUDA, and kDLCPU from kernel.py;
# TVM's pooled allocator)
KDL_CUDA = 2
POOLED_ALLOCATOR = 2
# a CUDA model's kernels as compiled at deploy time (`deploy._write_device_code`):
# the manifest's roles for the source the library holds and for its cubin
DEVICE_SOURCE = "device_source"
DEVICE_BINARY = "device_binary"
_device_binaries: dict[str, bytes] = {}  # CUDA source -> its cubin, of every model loaded
_device_lock = threading.Lock()
_other_compiler: list[Any] = []  # the callback registered before ours (TVM's nvcc), if any


def _compiled_device_code(code: str, *rest: Any) -> bytes:
    """`tvm_callback_cuda_compile`: TVM's CUDA runtime, loading a library that holds
    its kernels as source, asks for them compiled. A deployed model ships them
    compiled, so the answer is looked up, not compiled here; other sources go to the
    callback registered before (where the TVM compiler is in the process)."""
    with _device_lock:
        binary = _device_binaries.get(code)
    if binary is not None:
        return binary
    if _other_compiler and _other_compiler[0] is not None:
        return _other_compiler[0](code, *rest)
    raise ToolchainError("a CUDA library holds kernels as source that no loaded "
                         "artifact ships compiled (redeploy it with this convgen)")


def _provide_device_code(manifest: ModelManifest, directory: Path) -> None:
    """Make the model's compiled kernels the answer to TVM's request for them."""
    import tvm_ffi

    if DEVICE_BINARY not in manifest.files:
        return
    code = manifest.path_of(DEVICE_SOURCE, directory).read_text()
    binary = manifest.path_of(DEVICE_BINARY, directory).read_bytes()
    with _device_lock:
        _device_binaries[code] = binary
        if not _other_compiler:
            _other_compiler.append(tvm_ffi.get_global_func("tvm_callback_cuda_compile",
                                                           allow_missing=True))
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", _compiled_device_code,
                                         override=True)


class Model:
    """A deployed model: `model(x)`, `model(*inputs)` or `model(**{name: array})`
    returns the output as a numpy array (a tuple of them where the model has several).
    A CUDA model copies numpy inputs to the GPU and its outputs back; given device
    tensors alone (DLPack) it returns device tensors. Loading checks every file
    against the manifest's sizes and hashes. Calls from several threads take turns:
    the VM keeps each call's registers and storage in itself (two at once crashed it),
    and one call already runs on every core."""

    def __init__(self, manifest_path: Path, manifest: ModelManifest | None = None) -> None:
        self.manifest_path = manifest_path
        self.directory = manifest_path.parent
        self.manifest = manifest if manifest is not None else ModelManifest.read(manifest_path)
        self.manifest.check_files(self.directory)
        self.name = self.manifest.name
        self.inputs: list[TensorInfo] = self.manifest.inputs
        self.outputs: list[TensorInfo] = self.manifest.outputs
        self.module_path = self.manifest.path_of("module", self.directory)
        self.device = self.manifest.target.device
        self._main: Any = None
        self._vm: Any = None
        self._turn = threading.Lock()

    def __repr__(self) -> str:
        return f"<convgen.Model {self.name}: {len(self.manifest.layers)} convgen layers>"

    @property
    def main(self) -> Any:
        """The raw VM function: main(*inputs) on DLPack tensors."""
        if self._main is None:
            import tvm_ffi

            load_tvm_runtime()
            devices = [KDL_CPU, 0, POOLED_ALLOCATOR]
            if self.device == "cuda":
                from convgen.runtime import cuda_driver

                cuda_driver.device_name()  # no GPU: one clear error before the loader's
                load_tvm_runtime_cuda()
                _provide_device_code(self.manifest, self.directory)
                devices = [KDL_CUDA, 0, POOLED_ALLOCATOR, *devices]
            try:
                lib = tvm_ffi.load_module(str(self.module_path.resolve()))
                vm = lib["vm_load_executable"]()
                vm["vm_initialization"](*devices)
                self._main, self._vm = vm[self.manifest.entry], (lib, vm)
            except Exception as err:  # tvm-ffi raises its own error types
                raise ToolchainError(f"cannot load {self.module_path}: {err}") from None
        return self._main

    def arguments(self, args: tuple[Any, ...], named: dict[str, Any]) -> list[Any]:
        """The inputs in the model's order, checked, as arrays the VM takes."""
        names = [t.name for t in self.inputs]
        unknown = sorted(set(named) - set(names))
        if unknown:
            raise ArgumentError(f"{unknown[0]}: not an input of {self.name} "
                                f"(inputs: {', '.join(names)})")
        if len(args) + len(named) != len(names) or any(n in named for n in names[:len(args)]):
            raise ArgumentError(f"inputs: {self.name} takes {len(names)} "
                                f"({', '.join(names)}), got {len(args) + len(named)}")
        given = [*args, *(named[n] for n in names[len(args):])]
        out = []
        for info, a in zip(self.inputs, given):
            check_tensor(info, a)
            # in place where the VM can take it (functions reading inputs are declared
            # at the element's alignment, `deploy._inputs_at_element_alignment`); a
            # strided, misaligned or read-only array (DLPack exports no read-only
            # ones: np.asarray of an image, np.frombuffer) is copied
            out.append(host_usable(a, info.dtype, np.dtype(info.dtype).itemsize))
        return out

    def __call__(self, *args: Any, **named: Any) -> Any:
        given = self.arguments(args, named)
        to_host: Any = np.from_dlpack
        if self.device == "cuda":
            from convgen.runtime import cuda_driver

            # device tensors alone stay on the device; numpy goes there and comes back
            to_host = cuda_driver.to_numpy if any(
                isinstance(a, np.ndarray) for a in given) else (lambda r: r)
            given = [cuda_driver.DeviceArray.from_numpy(a) if isinstance(a, np.ndarray)
                     else a for a in given]
        with self._turn:
            result = self.main(*given)
        if len(self.outputs) == 1:
            return to_host(result)
        return tuple(to_host(r) for r in result)


def load_model(path: str | os.PathLike[str]) -> Model:
    from convgen.runtime.manifest import find_model_manifest

    found = find_model_manifest(path)
    if found is None:
        from convgen.errors import ArtifactError

        raise ArtifactError(f"artifact: {path} is not a deployed model (no model manifest)")
    return Model(found)
