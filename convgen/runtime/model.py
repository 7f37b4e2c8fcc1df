"""Loading and calling deployed models (`convgen deploy`): `convgen.load(DIR)`.

A deployed model is a Relax VM executable in one shared library. Like single
kernels it needs tvm-ffi and TVM's runtime library (the VM, the thread pool),
never the TVM compiler: the library is opened with `tvm_ffi.load_module`, its
`vm_load_executable` gives the VM, and `vm_initialization` readies it on the CPU.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from convgen.errors import ArgumentError, ToolchainError
from convgen.runtime.kernel import check_tensor, load_tvm_runtime
from convgen.runtime.manifest import ModelManifest, TensorInfo

# the VM's device and allocator codes (DLPack's kDLCPU; TVM's pooled allocator)
KDL_CPU = 1
POOLED_ALLOCATOR = 2


class Model:
    """A deployed model: `model(x)`, `model(*inputs)` or `model(**{name: array})`
    returns the output as a numpy array (a tuple of them where the model has several).
    Loading checks every file against the manifest's sizes and hashes."""

    def __init__(self, manifest_path: Path, manifest: ModelManifest | None = None) -> None:
        self.manifest_path = manifest_path
        self.directory = manifest_path.parent
        self.manifest = manifest if manifest is not None else ModelManifest.read(manifest_path)
        self.manifest.check_files(self.directory)
        self.name = self.manifest.name
        self.inputs: list[TensorInfo] = self.manifest.inputs
        self.outputs: list[TensorInfo] = self.manifest.outputs
        self.module_path = self.manifest.path_of("module", self.directory)
        self._main: Any = None
        self._vm: Any = None

    def __repr__(self) -> str:
        return f"<convgen.Model {self.name}: {len(self.manifest.layers)} convgen layers>"

    @property
    def main(self) -> Any:
        """The raw VM function: main(*inputs) on DLPack tensors."""
        if self._main is None:
            import tvm_ffi

            load_tvm_runtime()
            try:
                lib = tvm_ffi.load_module(str(self.module_path.resolve()))
                vm = lib["vm_load_executable"]()
                vm["vm_initialization"](KDL_CPU, 0, POOLED_ALLOCATOR)
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
            out.append(np.ascontiguousarray(a) if isinstance(a, np.ndarray) else a)
        return out

    def __call__(self, *args: Any, **named: Any) -> Any:
        result = self.main(*self.arguments(args, named))
        if len(self.outputs) == 1:
            return np.from_dlpack(result)
        return tuple(np.from_dlpack(r) for r in result)


def load_model(path: str | os.PathLike[str]) -> Model:
    from convgen.runtime.manifest import find_model_manifest

    found = find_model_manifest(path)
    if found is None:
        from convgen.errors import ArtifactError

        raise ArtifactError(f"artifact: {path} is not a deployed model (no model manifest)")
    return Model(found)
