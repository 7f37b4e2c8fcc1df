"""The CLI through click's CliRunner: outputs, exit codes, and never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from convgen.cli import main

SMALL = ["--mode", "conv", "--input", "1x4x8x8", "--kernel", "8x4x3x3", "--padding", "same"]


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    assert "Traceback" not in result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def test_build_then_verify(tmp_path):
    code, out = run("build", *SMALL, "--out", str(tmp_path))
    assert code == 0, out
    assert "verification passed" in out
    names = {p.suffix for p in tmp_path.iterdir()}
    assert names == {".so", ".onnx", ".json"}
    manifest = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert manifest["spec"]["mode"] == "conv" and manifest["entry"]
    assert manifest["verification"]["status"] == "passed"
    assert manifest["inputs"][0] == {"name": "data", "shape": [1, 4, 8, 8], "dtype": "float32"}
    code, out = run("verify", str(tmp_path), "--json")
    assert code == 0
    assert json.loads(out)[0]["verification"]["status"] == "passed"


def test_build_json_and_emit_source(tmp_path):
    code, out = run("build", *SMALL, "--out", str(tmp_path), "--json", "--emit-source",
                    "--no-verify")
    assert code == 0
    [result] = json.loads(out)
    assert result["verification"]["status"] == "not run"
    for key in ("module", "onnx", "tir", "llvm_ir", "asm"):
        assert Path(result["files"][key]).is_file(), key


def test_verify_from_flags():
    code, out = run("verify", *SMALL)
    assert code == 0 and "verification passed" in out


def test_inspect():
    code, out = run("inspect", "--mode", "corr", "--input", "1x3x5x5", "--kernel", "1x3x3x3",
                    "--what", "tir")
    assert code == 0
    assert "T.prim_func" in out and "schedule:" in out


def test_spec_file(tmp_path):
    spec = tmp_path / "kernels.toml"
    spec.write_text('[a]\nmode = "conv"\ninput = "1x2x6x6"\nkernel = "2x2x3x3"\n\n'
                    '[b]\nmode = "corr"\ninput = "1x6x6x2"\nkernel = "2x3x3x2"\nlayout = "NHWC"\n')
    code, out = run("build", "--spec", str(spec), "--out", str(tmp_path / "out"))
    assert code == 0, out
    assert len(list((tmp_path / "out").glob("*.json"))) == 2


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--mode", "conv", "--input", "1x4x8x8", "--kernel", "8x3x3x3"], "kernel"),
        (["--mode", "conv", "--input", "1x4x8", "--kernel", "8x4x3", "--groups", "3"], "groups"),
        (["--mode", "conv", "--input", "1x4x8x8", "--kernel", "8x4x3x3", "--padding", "big"],
         "padding"),
        (["--mode", "conv", "--input", "1x4x8x8", "--kernel", "8x4x3x3", "--target", "tpu"],
         "target"),
        # a CPU or GPU LLVM / nvcc would not compile for (a typo would silently get
        # generic x86-64 code)
        (["--mode", "conv", "--input", "1x4x8x8", "--kernel", "8x4x3x3", "--target",
          "llvm:znver33"], "target"),
        (["--mode", "conv", "--input", "1x4x8x8", "--kernel", "8x4x3x3", "--target",
          '{"kind": "llvm", "mcpu": "skylake-avx5120"}'], "target"),
        (["--mode", "conv", "--input", "1x4x8x8", "--kernel", "8x4x3x3", "--target",
          "cuda:sm_10"], "target"),
        (["--input", "1x4x8x8", "--kernel", "8x4x3x3"], "mode"),
        (["--mode", "conv", "--input", "1x4x2x2", "--kernel", "8x4x3x3"], "kernel"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, field):
    out_dir = tmp_path / "out"
    code, out = run("build", *args, "--out", str(out_dir))
    assert code == 2
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"Error: {field}:"), out
    assert not out_dir.exists() or not any(out_dir.iterdir())  # nothing half-written


@pytest.mark.parametrize(("args", "option"), [
    (["bench", "--mode", "corr", "--input", "1x4x8x8", "--kernel", "8x4x3x3", "--repeats", "0"],
     "--repeats"),
    (["tune", "--mode", "corr", "--input", "1x4x8x8", "--kernel", "8x4x3x3", "--trials", "0"],
     "--trials"),
    (["tune", "--mode", "corr", "--input", "1x4x8x8", "--kernel", "8x4x3x3", "--minutes", "0"],
     "--minutes"),
])
def test_counts_below_one_are_refused(args, option):
    """`bench --repeats 0` printed a table of medians of no samples."""
    code, out = run(*args)
    assert code == 2 and f"Invalid value for '{option}'" in out, out


def test_failed_build_leaves_nothing(tmp_path, monkeypatch, cpu_target):
    """A crash between writing the module and the manifest leaves no artifact and no temp dir."""
    from convgen.compiler.build import build_artifact
    from convgen.spec import make_spec

    def explode(spec):
        raise RuntimeError("disk full")

    monkeypatch.setattr("convgen.onnx_export.export_onnx", explode)
    with pytest.raises(RuntimeError):
        build_artifact(make_spec(mode="conv", input="1x1x5x5", kernel="1x1x3x3"), cpu_target,
                       tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_failed_verification_exits_1(tmp_path, monkeypatch):
    """A kernel that computes the wrong thing is reported, recorded as failed, exit 1."""
    import convgen.runtime.verify as verify_mod

    real = verify_mod.reference_conv

    def off_by_flip(spec, data, weight, *rest):
        return real(spec, data, verify_mod.flip_weight(spec, weight), *rest)

    monkeypatch.setattr(verify_mod, "reference_conv", off_by_flip)
    code, out = run("build", *SMALL, "--out", str(tmp_path))
    assert code == 1
    assert "verification failed" in out and "FAIL numpy oracle" in out
    manifest = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert manifest["verification"]["status"] == "failed"


@pytest.mark.parametrize("epilogue", [{}, {"residual": True, "activation": "hardswish"}])
def test_bench_feeds_onnxruntime_the_data_alone(epilogue):
    """The onnxruntime peer holds the weights (and bias) as initializers, flipped once
    for conv, is fed the data alone (and the residual), and computes the same as the
    kernel."""
    import numpy as np

    from convgen.reference import reference_conv
    from convgen.runtime import bench
    from convgen.runtime.verify import random_inputs
    from convgen.spec import make_spec

    spec = make_spec(mode="conv", input="1x4x8x8", kernel="6x4x3x3", padding=1, bias=True,
                     **epilogue)
    inputs = random_inputs(spec, 0)
    call = bench._onnxruntime_call(spec, inputs)
    [session] = [c.cell_contents for c in call.__closure__
                 if type(c.cell_contents).__name__ == "InferenceSession"]
    per_call = ["data", "residual"] if spec.residual else ["data"]
    assert [i.name for i in session.get_inputs()] == per_call
    (got,) = call()
    np.testing.assert_allclose(got, reference_conv(spec, *inputs.values()), rtol=1e-4,
                               atol=1e-5)


def test_version_and_help():
    code, out = run("--version")
    assert code == 0 and "convgen" in out
    code, out = run("build", "--help")
    assert "true convolution" in out and "cross-correlation" in out


def test_bench_json_against_onnxruntime():
    code, out = run("bench", *SMALL, "--repeats", "3", "--json")
    assert code == 0, out
    (result,) = json.loads(out)
    # convgen through k(x, w), its raw entry, and onnxruntime with the weights as
    # initializers (fed the data alone, as a deployed model is)
    assert {"convgen", "convgen_raw", "onnxruntime"} <= set(result["times"])
    assert "convgen_raw" not in result["speedup"] and "call_overhead" in result
    assert result["speedup"]["onnxruntime"] > 0
    assert result["algorithm"] == "direct"  # the table says which algorithm ran
    assert result["schedule"].startswith("cpu_")  # which template the kernel used
    t = result["times"]["convgen"]
    assert 0 < t["p10"] <= t["median"] <= t["p90"]
    # a saved run prints the same table again (scripts/bench_table.py)
    from convgen.runtime.bench import BenchResult, format_table

    again = BenchResult.from_dict(result)
    assert again.to_dict() == result
    assert format_table([again])[2].startswith(f"| {result['name']} |")
