"""nvcc: CUDA-host C++ -> a loadable tvm-ffi module (.so).

Runtime side (needs nvcc and tvm-ffi only, not the TVM compiler), so CUDA
sources generated on one machine can be compiled on the GPU machine:
`convgen build --target cuda --defer-nvcc` here, `convgen compile DIR` there.
The CUDA runtime is linked statically (nvcc's default): the .so then needs only
libtvm_ffi.so and the NVIDIA driver.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from convgen.errors import ToolchainError
from convgen.runtime.cores import available_cores
from convgen.runtime.manifest import ArtifactFile, Manifest, list_manifests, not_run


def find_nvcc() -> str:
    nvcc = shutil.which("nvcc") or os.path.join(
        os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"
    )
    if not os.path.exists(nvcc):
        raise ToolchainError("nvcc not found: install the CUDA toolkit or put nvcc on PATH")
    return nvcc


def _device_flags(arch: str) -> list[str]:
    """nvcc's flags for TVM's generated device code, for one GPU arch (sm_90)."""
    number = arch.removeprefix("sm_")
    return [
        "-O3", f"-gencode=arch=compute_{number},code=sm_{number}",
        "-diag-suppress", "174,177",  # TVM's generated code: "no effect" / "unused" noise
    ]


def nvcc_command(source: Path, output: Path, arch: str) -> list[str]:
    import tvm_ffi.libinfo

    includes = [f"-I{p}" for p in tvm_ffi.libinfo.include_paths()]
    libdir = os.path.dirname(tvm_ffi.libinfo.find_libtvm_ffi())
    return [
        find_nvcc(), *_device_flags(arch), "-std=c++17", "-shared", "-Xcompiler", "-fPIC",
        *includes, str(source), "-o", str(output),
        f"-L{libdir}", "-ltvm_ffi",
    ]  # fmt: skip


def nvcc(source: Path, output: Path, arch: str) -> None:
    """Compile `source` into `output`, written atomically (a temp name, then renamed)."""
    tmp = output.with_name(f".{output.name}.tmp")
    proc = subprocess.run(nvcc_command(source, tmp, arch), capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise ToolchainError(
            f"nvcc failed ({proc.returncode}) on {source.name}:\n{proc.stderr.strip()[-2000:]}"
        )
    os.replace(tmp, output)


def compile_artifact(manifest_path: Path) -> float:
    """nvcc one deferred CUDA artifact and mark its manifest compiled (atomically),
    with the module's size and hash. Returns the seconds nvcc took (0 when it was
    compiled already)."""
    m = Manifest.read(manifest_path)
    if m.module_compiled:
        return 0.0
    directory = manifest_path.parent
    module = m.path_of("module", directory)
    t0 = time.perf_counter()
    nvcc(m.path_of("cuda_source", directory), module, m.target.cuda_arch)
    seconds = time.perf_counter() - t0
    dataclasses.replace(
        m, module_compiled=True,
        files={**m.files, "module": ArtifactFile.of(module)},
        build_seconds={**m.build_seconds, "nvcc": seconds},
        verification=not_run("compiled by convgen compile; run convgen verify DIR"),
    ).write(manifest_path)
    return seconds


def compile_artifacts(path: str | os.PathLike[str], jobs: int = 0) -> list[tuple[str, float]]:
    """`convgen compile DIR`: nvcc every CUDA artifact in DIR that was built with
    --defer-nvcc, in parallel. Returns (name, seconds)."""
    pending = [p for p in list_manifests(path) if not Manifest.read(p).module_compiled]
    with ThreadPoolExecutor(max_workers=jobs or available_cores()) as pool:
        seconds = list(pool.map(compile_artifact, pending))
    return [(p.stem, t) for p, t in zip(pending, seconds)]


def device_binary(code: str, arch: str) -> bytes:
    """CUDA device code (a kernel source without host code, as TVM's CUDA code
    generator writes it for a module that a host module launches) as a cubin for
    `arch`, by nvcc."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="convgen-nvcc-") as tmp:
        src, out = Path(tmp) / "device.cu", Path(tmp) / "device.cubin"
        src.write_text(code)
        cmd = [find_nvcc(), *_device_flags(arch), "--cubin", str(src), "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ToolchainError(f"nvcc failed ({proc.returncode}) on a model's device code:\n"
                                 f"{proc.stderr.strip()[-2000:]}")
        return out.read_bytes()
