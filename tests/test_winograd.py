"""Winograd F(m x m, 3x3) on the CPU: every tile in both modes and layouts against
onnxruntime and a float64 oracle within the tolerance it states, dilated too, random
3x3 specs, and the algorithm choice (where it declines, it says why)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from convgen.cli import main
from convgen.compiler.build import build_artifact
from convgen.compiler.schedule import schedule_for
from convgen.compiler.schedule.winograd import TEMPLATE as WINOGRAD
from convgen.compiler.targets import resolve_target
from convgen.errors import UnsupportedError
from convgen.reference import reference_conv
from convgen.runtime.kernel import load
from convgen.runtime.verify import (
    ALGORITHM_TOLERANCES,
    random_inputs,
    split_constants,
    within_tolerance,
)
from convgen.spec import ACTIVATIONS, ConvSpec, make_spec

# tails in both directions (10 rows, 9 columns: no tile size divides both), an
# asymmetric pad, bias, more than one image, a fused epilogue in the output transform
SPECS = [
    make_spec(mode=mode, input="2x5x10x9" if layout == "NCHW" else "2x10x9x5",
              kernel="16x5x3x3" if layout == "NCHW" else "16x3x3x5",
              padding="1,0,2,1", layout=layout, bias=True, residual=layout == "NCHW",
              activation="relu" if layout == "NCHW" else "silu")
    for mode in ("conv", "corr") for layout in ("NCHW", "NHWC")
]


@pytest.mark.parametrize("rows", [0, 1], ids=["staged", "fused"])
@pytest.mark.parametrize("tile", [2, 3, 4, 6])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name())
def test_every_tile_verifies(spec: ConvSpec, tile: int, rows: int, cpu_target, tmp_path):
    # fused: one tile row per task, whose 5, 3 or 2 tiles only pt=1 divides
    knobs = {"tile": tile, "lanes": 8, "nkv": 1, "pt": 1 if rows else 2, "rows": rows}
    art = build_artifact(spec, cpu_target, tmp_path, verify=True, template="cpu_winograd",
                         knobs=knobs)
    m = art.manifest
    assert m.algorithm == f"winograd_f{tile}"
    assert m.packed_weights is not None and m.packed_weights.packed.shape[0] == (tile + 2) ** 2
    report = m.verification
    assert report.passed, [c for c in report.checks if not c.passed]
    rtol, atol = ALGORITHM_TOLERANCES[m.algorithm]
    assert report.tolerance == {"rtol": rtol, "atol": atol}
    # the bound kernel against a float64 oracle, on other inputs
    inputs = random_inputs(spec, seed=5)
    want = reference_conv(spec, *(a.astype(np.float64) for a in inputs.values()))
    constants, per_call = split_constants(spec, inputs)
    got = load(art.manifest_path).bind(*constants)(*per_call)
    assert within_tolerance(got, want, "float32", m.algorithm).all()


# Dilated: each output phase's own tiles (an 11 x 9 output in 3 x 2 phases, their
# lattices of 4 or 3 rows by 5 or 4 columns: tails in every tile size), with the same
# epilogues
DILATED = [dataclasses.replace(s, in_size=(11, 10), pads=(3, 2, 3, 1), dilation=(3, 2))
           for s in SPECS]


@pytest.mark.parametrize("tile", [2, 3, 4, 6])
@pytest.mark.parametrize("spec", DILATED, ids=lambda s: s.name())
def test_dilated_tiles_verify(spec: ConvSpec, tile: int, cpu_target, tmp_path):
    knobs = {"tile": tile, "lanes": 8, "nkv": 1, "pt": 2}
    art = build_artifact(spec, cpu_target, tmp_path, verify=True, template="cpu_winograd",
                         knobs=knobs)
    assert art.manifest.algorithm == f"winograd_f{tile}"
    assert art.manifest.verification.passed
    inputs = random_inputs(spec, seed=7)
    want = reference_conv(spec, *(a.astype(np.float64) for a in inputs.values()))
    constants, per_call = split_constants(spec, inputs)
    got = load(art.manifest_path).bind(*constants)(*per_call)
    assert within_tolerance(got, want, "float32", art.manifest.algorithm).all()
    # its tiles are not runs of output rows: the fused arrangement declines
    with pytest.raises(UnsupportedError, match="does not apply"):
        build_artifact(spec, cpu_target, tmp_path / "fused", verify=False,
                       template="cpu_winograd", knobs={**knobs, "pt": 1, "rows": 1})


@st.composite
def winograd_specs(draw: st.DrawFn) -> ConvSpec:
    layout = draw(st.sampled_from(["NCHW", "NHWC"]))
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 12))
    k = 8 * draw(st.integers(1, 3))
    dh, dw = draw(st.sampled_from([1, 1, 2, 3])), draw(st.sampled_from([1, 1, 2, 3]))
    h, w = draw(st.integers(2 * dh + 1, 13)), draw(st.integers(2 * dw + 1, 13))
    pads = [draw(st.integers(0, 2)) for _ in range(4)]
    shape = f"{n}x{c}x{h}x{w}" if layout == "NCHW" else f"{n}x{h}x{w}x{c}"
    kernel = f"{k}x{c}x3x3" if layout == "NCHW" else f"{k}x3x3x{c}"
    return make_spec(mode=draw(st.sampled_from(["conv", "corr"])), input=shape, kernel=kernel,
                     padding=",".join(map(str, pads)), dilation=f"{dh},{dw}", layout=layout,
                     bias=draw(st.booleans()), residual=draw(st.booleans()),
                     activation=draw(st.sampled_from(ACTIVATIONS)))


@settings(max_examples=10, deadline=None)
@given(spec=winograd_specs(), seed=st.integers(0, 2**16),
       fused_tile=st.sampled_from([None, 2, 3, 4, 6]))
def test_random_3x3_specs_through_winograd(spec: ConvSpec, seed: int, fused_tile: int | None,
                                           cpu_target, tmp_path_factory):
    """Through the chooser (on these small channel counts: the staged arrangement), or
    forced into the fused one, one tile row per task, with a drawn tile."""
    out = tmp_path_factory.mktemp("wino")  # a fresh directory: a module path is loaded once
    if fused_tile is None:
        art = build_artifact(spec, cpu_target, out, verify=False, algorithm="winograd")
    else:
        # (one tile per row, one input channel, or dilated: the fused nest declines,
        # `_fusable`)
        assume(spec.in_channels > 1 and spec.out_size[-1] > fused_tile
               and spec.dilation == (1, 1))
        knobs = {"tile": fused_tile, "lanes": 8, "nkv": 1, "pt": 1, "rows": 1}
        art = build_artifact(spec, cpu_target, out, verify=False, template="cpu_winograd",
                             knobs=knobs)
    algorithm = art.manifest.algorithm
    assert algorithm.startswith("winograd_f")
    inputs = random_inputs(spec, seed)
    want = reference_conv(spec, *(a.astype(np.float64) for a in inputs.values()))
    kernel = load(art.manifest_path)
    constants, per_call = split_constants(spec, inputs)
    for got in (kernel(*inputs.values()), kernel.bind(*constants)(*per_call)):
        assert within_tolerance(got, want, "float32", algorithm).all()


def test_algorithm_choice(cpu_target):
    dense = make_spec(mode="conv", input="1x64x28x28", kernel="64x64x3x3", padding=1)
    assert schedule_for(dense, cpu_target, use_records=False)[1].name == "cpu_winograd"
    # on 2 cores (a fused task per tile row needs a row per core), fused where U
    # (36 x 64 x 64 floats) is a few times L2 or less; staged where it is many MB
    # (36 x 512 x 512 floats) and the tiles few
    zen4, avx2 = (resolve_target(f'{{"kind": "llvm", "mcpu": "{cpu}", "num-cores": 2}}')
                  for cpu in ("znver4", "znver3"))
    assert schedule_for(dense, zen4, use_records=False)[1].knobs["rows"] == 1
    deep = make_spec(mode="conv", input="1x512x14x14", kernel="512x512x3x3", padding=1)
    assert schedule_for(deep, zen4, use_records=False)[1].knobs["rows"] == 0
    # and tuning, which times kernels warm, is not offered the fused arrangement there
    # either: every fused task would read all of U, from memory in a model
    grid = list(WINOGRAD.grid(deep, zen4))
    assert grid and not any(knobs.rows for knobs in grid)
    assert any(knobs.rows for knobs in WINOGRAD.grid(dense, zen4))
    # a core of twice the FMA lanes a cycle (Zen 5) waits on U's rereads sooner: 28x28
    # C128 (U 2.4 MB) fused on Zen 4, staged on Zen 5; 56x56 C64 (0.6 MB) fused on both
    zen5 = resolve_target('{"kind": "llvm", "mcpu": "znver5", "num-cores": 2}')
    c128 = make_spec(mode="corr", input="1x28x28x128", kernel="128x3x3x128", padding=1,
                     layout="NHWC")
    c64 = make_spec(mode="corr", input="1x56x56x64", kernel="64x3x3x64", padding=1,
                    layout="NHWC")
    assert [schedule_for(c128, t, use_records=False)[1].knobs["rows"]
            for t in (zen4, zen5)] == [1, 0]
    assert [schedule_for(c64, t, use_records=False)[1].knobs["rows"]
            for t in (zen4, zen5)] == [1, 1]
    # staged, the fewest tile blocks (each rereads a plane's U) whose loads the core
    # issues as fast as the FMAs need them: one 512-bit FMA a cycle on Zen 4, two
    # 256-bit ones with AVX2 (1 x 8 would need 2.3 loads a cycle there, of 2), two
    # 512-bit ones on Zen 5 (2.3 of its 4)
    deep_knobs = {name: schedule_for(deep, t, use_records=False)[1].knobs
                  for name, t in (("zen4", zen4), ("avx2", avx2), ("zen5", zen5))}
    assert (deep_knobs["zen4"]["nkv"], deep_knobs["zen4"]["pt"]) == (1, 8)
    assert (deep_knobs["zen5"]["nkv"], deep_knobs["zen5"]["pt"]) == (1, 8)
    assert (deep_knobs["avx2"]["nkv"], deep_knobs["avx2"]["pt"]) == (2, 4)
    # with 16 registers, 7 x 7 tiles: a run of tiles per U load, not 8 vectors x 1 tile
    mid = make_spec(mode="corr", input="1x128x28x28", kernel="128x128x3x3", padding=1)
    assert schedule_for(mid, avx2, use_records=False)[1].knobs["pt"] > 1
    assert schedule_for(dense, cpu_target, use_records=False,
                        algorithm="direct")[1].name != "cpu_winograd"
    strided = dataclasses.replace(dense, stride=(2, 2))
    assert schedule_for(strided, cpu_target, use_records=False)[1].name != "cpu_winograd"
    with pytest.raises(UnsupportedError, match="stride 1"):
        schedule_for(strided, cpu_target, algorithm="winograd")
    # dilated by 2 (FCN's layers): 4 phases of 14 x 14, 64 tiles of 4 x 4, 3x fewer
    # multiply-adds than direct, staged; dilated by 12 on 28 x 28 (DeepLab's ASPP)
    # each phase is 3 x 3 pixels, most of every tile cropped: direct
    fcn = make_spec(mode="corr", input="1x28x28x256", kernel="256x3x3x256", padding=2,
                    dilation=2, layout="NHWC")
    for target in (zen4, avx2):
        choice = schedule_for(fcn, target, use_records=False)[1]
        assert choice.name == "cpu_winograd"
        assert (choice.knobs["tile"], choice.knobs["rows"]) == (4, 0)
    aspp = dataclasses.replace(fcn, in_channels=512, pads=(12,) * 4, dilation=(12, 12))
    assert schedule_for(aspp, avx2, use_records=False)[1].name != "cpu_winograd"


def test_cli_says_why_winograd_declines(tmp_path):
    flags = ["--mode", "conv", "--input", "1x8x9x9", "--kernel", "8x2x3x3", "--groups", "4"]
    result = CliRunner().invoke(main, ["build", *flags, "--algorithm", "winograd",
                                       "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "algorithm: winograd does not apply" in result.output
    assert "ungrouped" in result.output
    assert not list(tmp_path.iterdir())  # nothing half-written
    result = CliRunner().invoke(main, ["inspect", *flags, "--what", "tir"])
    assert result.exit_code == 0
    assert "// algorithm: direct" in result.output and "ungrouped" in result.output
