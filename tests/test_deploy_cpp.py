"""The C++ deployment examples compile and run: a kernel artifact gets the seed answer
through the plain entry and through the packing and run-packed entries; a deployed
model gives what it gives from Python."""

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


def _compile(source: Path, exe: Path) -> Path:
    import tvm_ffi.libinfo as info

    libdir = os.path.dirname(info.find_libtvm_ffi())
    subprocess.run(
        ["g++", "-std=c++17", "-O1", str(source), *(f"-I{p}" for p in info.include_paths()),
         f"-L{libdir}", "-ltvm_ffi", f"-Wl,-rpath,{libdir}", "-ldl", "-o", str(exe)],
        check=True, capture_output=True,
    )
    return exe


def _runtime() -> str:
    tvm_dir = importlib.util.find_spec("tvm").submodule_search_locations[0]
    return os.path.join(tvm_dir, "lib", "libtvm_runtime.so")


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_cpp_example(tmp_path, cpu_target):
    exe = _compile(EXAMPLE, tmp_path / "deploy")
    spec = make_spec(mode="conv", input="1x1x5x5", kernel="1x1x3x3")
    packed = build_artifact(spec, cpu_target, tmp_path, verify=False).manifest.packed_weights
    shape = "x".join(map(str, packed.packed.shape))
    out = subprocess.run([str(exe), str(tmp_path / f"{spec.name()}.so"), _runtime(), shape],
                         check=True, capture_output=True, text=True).stdout
    seed_answer = [[76, 72, 52], [81, 75, 62], [42, 42, 54]]  # scipy.signal.convolve2d
    assert [[float(v) for v in line.split()] for line in out.splitlines()] == seed_answer * 2


MODEL_EXAMPLE = Path(__file__).parent.parent / "examples" / "deploy_model.cc"


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_cpp_model_example(tmp_path, cpu_target):
    """A deployed model runs from C++ (tvm-ffi and TVM's runtime library) and gives
    what it gives from Python."""
    import numpy as np
    import onnx
    from test_deploy import residual_block

    import convgen
    from convgen.compiler.deploy import DeployOptions, deploy_artifact

    exe = _compile(MODEL_EXAMPLE, tmp_path / "deploy_model")
    model, _ = residual_block()
    onnx.save(model, tmp_path / "block.onnx")
    path, manifest = deploy_artifact(tmp_path / "block.onnx", cpu_target, tmp_path / "dep",
                                     DeployOptions(mode="conv"))
    x = np.random.default_rng(0).standard_normal(manifest.inputs[0].shape).astype(np.float32)
    x.tofile(tmp_path / "x.bin")
    shape = "x".join(map(str, x.shape))
    out = subprocess.run([str(exe), str(tmp_path / "dep" / "block.so"), _runtime(), shape,
                          str(tmp_path / "x.bin")], check=True, capture_output=True,
                         text=True).stdout.split()
    assert out[0] == "1x10"
    got = np.array([float(v) for v in out[1:]], np.float32).reshape(1, 10)
    np.testing.assert_allclose(got, convgen.load(path)(x), rtol=1e-6, atol=1e-6)
