"""The README's C++ deployment example compiles, loads an artifact and gets the seed answer,
through the plain entry and through the packing and run-packed entries."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from convgen.compiler.build import build_artifact
from convgen.spec import make_spec

EXAMPLE = Path(__file__).parent.parent / "examples" / "deploy.cc"


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_cpp_example(tmp_path, cpu_target):
    import tvm_ffi.libinfo as info

    libdir = os.path.dirname(info.find_libtvm_ffi())
    exe = tmp_path / "deploy"
    subprocess.run(
        ["g++", "-std=c++17", "-O1", str(EXAMPLE), *(f"-I{p}" for p in info.include_paths()),
         f"-L{libdir}", "-ltvm_ffi", f"-Wl,-rpath,{libdir}", "-ldl", "-o", str(exe)],
        check=True, capture_output=True,
    )
    spec = make_spec(mode="conv", input="1x1x5x5", kernel="1x1x3x3")
    packed = build_artifact(spec, cpu_target, tmp_path, verify=False).manifest.packed_weights
    tvm_dir = importlib.util.find_spec("tvm").submodule_search_locations[0]
    runtime = os.path.join(tvm_dir, "lib", "libtvm_runtime.so")
    shape = "x".join(map(str, packed.packed.shape))
    out = subprocess.run([str(exe), str(tmp_path / f"{spec.name()}.so"), runtime, shape],
                         check=True, capture_output=True, text=True).stdout
    seed_answer = [[76, 72, 52], [81, 75, 62], [42, 42, 54]]  # scipy.signal.convolve2d
    assert [[float(v) for v in line.split()] for line in out.splitlines()] == seed_answer * 2
