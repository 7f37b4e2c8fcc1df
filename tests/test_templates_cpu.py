"""Every CPU template, forced, over the shared case table in both modes: its default
knobs and the ends and middle of its tuning grid, against the numpy oracle and onnxruntime
(through verify) — a template must be right for every spec it accepts, not only for
those the chooser happens to give it."""

from __future__ import annotations

import dataclasses

import pytest
from cases import case_specs

from convgen.compiler.build import build_artifact
from convgen.compiler.schedule import cpu, winograd
from convgen.compiler.targets import resolve_target
from convgen.spec import ConvSpec, make_spec

TARGET = resolve_target("llvm")
# Knob points are also drawn as for a 256-bit AVX2 CPU (and compiled for this one):
# the table's channel counts (8-32) are whole 8-lane vectors, so on an AVX-512 host
# its own 16-lane points alone would leave cpu_kvec and cpu_cvec mostly untested.
KNOB_TARGETS = (TARGET, resolve_target("llvm:znver3"))


def _params() -> list:
    params = []
    for p in case_specs():
        spec: ConvSpec = p.values[0]
        for t in cpu.TEMPLATES:
            picks = []
            for knob_target in KNOB_TARGETS:
                grid = t.candidates(spec, knob_target)
                # the grid may apply where the heuristic declines (tuning tries it
                # there); its ends and middle vary every knob (rows, k_inner, ...)
                # across the table
                picks += [t.heuristic(spec, knob_target), *grid[:1],
                          *grid[len(grid) // 2 :][:1], *grid[-1:]]
            for knobs in dict.fromkeys(k for k in picks if k is not None):
                kid = "-".join(f"{v}" for v in dataclasses.asdict(knobs).values())
                params.append(pytest.param(spec, t.name, knobs,
                                           id=f"{t.name}[{kid}]-{spec.name()}"))
    return params


@pytest.mark.parametrize(("spec", "template", "knobs"), _params())
def test_template_is_correct(spec, template, knobs, tmp_path):
    art = build_artifact(spec, TARGET, tmp_path, verify=True, template=template,
                         knobs=dataclasses.asdict(knobs))
    report = art.manifest.verification
    assert art.manifest.schedule.name == template
    assert report.passed, [c for c in report.checks if not c.passed]


def test_every_template_is_exercised():
    names = {p.values[1] for p in _params()}
    assert names == {t.name for t in cpu.TEMPLATES}


@pytest.mark.parametrize("mode", ["conv", "corr"])
@pytest.mark.parametrize(("flags", "knobs"), [
    # a 13-wide row in 8-lane tiles: widened to 16, the last tile cropped to 5 lanes
    (dict(input="1x8x5x13", kernel="16x8x3x3", padding=[1, 0, 2, 1], bias=True,
          dtype="float16"), cpu.WvecKnobs(lanes=8, kb=4, rows=3)),
    (dict(input="1x16x6x6", kernel="16x1x3x3", padding=1, groups=16, bias=True),
     cpu.WvecKnobs(lanes=8, kb=2, rows=3)),  # depthwise, padded planes made in the tile
], ids=["dense-bias-f16", "depthwise-bias"])
def test_wvec_widened_rows_are_cropped(flags, knobs, mode, tmp_path):
    """Rows widened to whole vectors compute outputs that do not exist; the epilogue
    (bias, cast) must crop them wherever the tile ends."""
    spec = make_spec(mode=mode, **flags)
    assert cpu.row_extra(spec, knobs.lanes) > 0
    test_template_is_correct(spec, "cpu_wvec", knobs, tmp_path)


@pytest.mark.parametrize("mode", ["conv", "corr"])
def test_kvec_widened_rows_are_cropped(mode, tmp_path):
    """A 7-wide channels-last row computed 8 wide in 2 x 4 tiles: the eighth output
    does not exist, and the crop in the write-back must drop it before the epilogue
    (bias, residual, activation) writes anything."""
    spec = make_spec(mode=mode, input="1x9x7x16", kernel="16x3x3x16", padding=[1, 1, 1, 1],
                     stride=[1, 1], layout="NHWC", bias=True, residual=True,
                     activation="relu")
    test_template_is_correct(spec, "cpu_kvec",
                             cpu.KvecKnobs(lanes=8, nkv=2, pw=4, wide=1), tmp_path)


@pytest.mark.parametrize("mode", ["conv", "corr"])
@pytest.mark.parametrize("flags", [
    dict(input="1x7x7x16", kernel="16x1x1x16"),
    # stride 2, no padding: the widened output's taps (14-16) lie past the 15-wide row
    dict(input="1x9x15x16", kernel="16x3x3x16", stride=2),
], ids=["1x1", "3x3-stride2"])
def test_kvec_widened_unpadded_rows_read_the_input_in_place(flags, mode, tmp_path):
    """Without padding of its own, a widened row's extra outputs read the row's last
    input pixel again (the crop drops them), so there is no padded copy of the
    input to make; and they must still be cropped before the epilogue."""
    from convgen.compiler.build import lower
    from convgen.compiler.compute import RUN_PACKED_ENTRY

    spec = make_spec(mode=mode, layout="NHWC", bias=True, residual=True, activation="relu",
                     **flags)
    knobs = cpu.KvecKnobs(lanes=8, nkv=2, pw=4, wide=1)
    mod, _, _ = lower(spec, TARGET, "cpu_kvec", dataclasses.asdict(knobs))
    assert 'sblock("pad")' not in mod[RUN_PACKED_ENTRY].script()
    test_template_is_correct(spec, "cpu_kvec", knobs, tmp_path)


def test_kvec_widens_rows_only_where_no_tile_keeps_the_fma_pipes_busy():
    """16 registers: a 7-wide row divides only into 1 x 7 tiles (7 chains), so it is
    computed 8 wide; 32 registers keep 2 x 7 (14 chains) unwidened."""
    spec = make_spec(mode="corr", input="1x7x7x2048", kernel="512x1x1x2048", layout="NHWC")
    avx2 = cpu.kvec_heuristic(spec, resolve_target("llvm:znver3"))
    avx512 = cpu.kvec_heuristic(spec, resolve_target("llvm:znver4"))
    assert (avx2.wide, avx2.nkv * avx2.pw) == (1, 8)
    assert avx512.wide == 0 and avx512.nkv * avx512.pw >= cpu.FMA_CHAINS


@pytest.mark.parametrize("mode", ["conv", "corr"])
def test_wvec_takes_half_vectors_where_the_fallback_would_run(mode, tmp_path):
    """Channels-first, 16 lanes: a 56-wide row holds no whole vectors and K24 no whole
    vector of output channels, so neither cpu_wvec's full vectors nor cpu_kvec take
    the layer; rows of half vectors do (8 lanes), not the generic fallback. 8-lane
    targets keep cpu_kvec."""
    spec = make_spec(mode=mode, input="1x40x56x56", kernel="24x40x1x1", layout="NCHW",
                     bias=True, residual=True)
    avx512 = resolve_target("llvm:znver4")
    assert cpu.kvec_heuristic(spec, avx512) is None
    knobs = cpu._wvec_knobs(spec, avx512)
    assert knobs is not None and knobs.lanes == avx512.fp32_lanes // 2
    assert cpu._wvec_knobs(spec, resolve_target("llvm:znver3")) is None
    test_template_is_correct(spec, "cpu_wvec", knobs, tmp_path)


@pytest.mark.parametrize(("size", "c", "k", "rows", "tile"), [
    (28, 128, 512, 7, (4, 3, 2)),  # 28 -> 30 (6.7% thrown away); 196 -> 198 (1%)
    (14, 256, 1024, 7, (4, 3, 1)),  # 14 -> 15; 98 -> 99
    (7, 2048, 512, 7, (4, 3, 2)),  # 2 x 4 on 7 -> 8 (12.5%); 4 x 3 on 49 -> 51 (4%)
    (14, 384, 64, 7, (4, 3, 1)),  # 2 blocks x 2 rows of 98: 4 tasks, 2 per core
    (7, 960, 160, 7, (2, 5, 1)),  # 10 blocks of 2 vectors: 4 x 3 would leave 5 tasks
])
def test_pointwise_rows_merge_where_the_tile_would_widen_them(size, c, k, rows, tile):
    """16 registers: a pointwise layer's rows merge so that 4 x 3 tiles run across row
    ends and only the merged row is widened; 32 registers tile these rows unwidened."""
    spec = make_spec(mode="corr", input=f"1x{size}x{size}x{c}", kernel=f"{k}x1x1x{c}",
                     layout="NHWC", bias=True, residual=True)
    # (2 cores, as this project's machines: the merged rows are shared among them)
    avx2 = resolve_target('{"kind": "llvm", "mcpu": "znver3", "num-cores": 2}')
    assert cpu.kvec_heuristic(spec, avx2).wide
    assert cpu.rows_to_merge(spec, avx2) == rows
    if tile is not None:
        merged = cpu.kvec_heuristic(spec.rows_merged(rows), avx2)
        assert (merged.nkv, merged.pw, merged.wide, merged.k_inner) == (*tile, False)
    avx512 = resolve_target('{"kind": "llvm", "mcpu": "znver4", "num-cores": 2}')
    assert cpu.rows_to_merge(spec, avx512) == 1
    windowed = make_spec(mode="corr", input=f"1x{size}x{size}x{c}", kernel=f"{k}x3x3x{c}",
                         padding=1, layout="NHWC")
    assert cpu.rows_to_merge(windowed, avx2) == 1


def test_kvec_on_16_registers_ranks_fma_chains_before_loads():
    """16 registers: tiles of more FMA chains first. A 14-wide row of a grouped 3x3
    layer takes two channel vectors by 5 pixels on the row widened to 15 (10
    accumulators); a row that may not be widened (a depthwise-separable pair's 1x1
    stage) one vector by 7 (7 chains), not 2 x 2 (4 chains, fewer loads) nor 4 x 2."""
    avx2 = resolve_target("llvm:znver3")
    spec = make_spec(mode="corr", input="1x14x14x96", kernel="576x3x3x48", padding=1,
                     groups=2, layout="NHWC")
    tile = cpu.kvec_heuristic(spec, avx2)
    assert (tile.nkv, tile.pw, tile.wide, tile.flat) == (2, 5, 1, False)
    pointwise = make_spec(mode="corr", input="1x14x14x96", kernel="576x1x1x96",
                          layout="NHWC")
    tile = cpu.kvec_heuristic(pointwise, avx2, widen=False)
    assert (tile.nkv, tile.pw, tile.wide) == (1, 7, 0)


@pytest.mark.parametrize(("shape", "tile"), [
    (("1x224x224x3", "64x7x7x3", 3, 2), (2, 6, 2)),  # the 7x7 stem: 147 steps, 112 -> 114
    (("1x56x56x128", "128x3x3x128", 1, 2), (2, 6, 2)),  # 28 -> 30
    (("1x56x56x64", "128x3x3x64", 1, 1), (2, 6, 2)),  # flat: 3136 -> 3138
    (("1x224x224x3", "32x3x3x3", 1, 2), (2, 4, 0)),  # 27 steps, straight-line
    (("1x112x112x8", "64x3x3x8", 1, 2), (2, 4, 0)),  # 72 steps
    (("1x28x28x256", "256x3x3x256", 1, 2), (2, 6, 2)),  # flat: 196 -> 198
])
def test_kvec_long_windows_take_12_accumulators_on_16_registers(shape, tile):
    """16 registers: a windowed layer whose reduction runs long (at least
    LONG_REDUCTION steps) takes 2 x 6 (12 accumulators in 15 registers) on a row
    widened to a multiple of 6, or on its flat pixels (blocks outside the rows), where
    that wastes little; a short reduction keeps 2 x 4. 32 registers are not limited
    so."""
    data, kernel, pad, stride = shape
    spec = make_spec(mode="corr", input=data, kernel=kernel, padding=pad, stride=stride,
                     layout="NHWC", bias=True, activation="relu")
    knobs = cpu.kvec_heuristic(spec, resolve_target("llvm:znver3"))
    assert (knobs.nkv, knobs.pw, knobs.wide) == tile
    avx512 = cpu.kvec_heuristic(spec, resolve_target("llvm:znver4"))
    assert avx512.nkv * avx512.pw <= cpu.accumulator_budget(resolve_target("llvm:znver4")) + 2


@pytest.mark.parametrize(("flags", "tile"), [
    (dict(input="1x14x14x512", kernel="512x3x3x512", padding=1, stride=2), (2, 5, 1)),  # 49
    (dict(input="1x28x28x256", kernel="256x3x3x256", padding=1, stride=2), (2, 6, 2)),  # 196
    (dict(input="1x14x14x1024", kernel="2048x1x1x1024", stride=2), (4, 3, 2)),  # 1x1, 49
])
def test_kvec_narrow_windowed_rows_run_flat_on_16_registers(flags, tile):
    """16 registers: a windowed (or strided) channels-last layer with its blocks
    outside the rows tiles the image's pixels as one row, where a 7- or 14-wide row
    would take 2 x 4 on 8 or 2 x 5 on 15; 32 registers keep rows (2 x 7 divides
    them); a pointwise layer merges its rows instead (`rows_to_merge`)."""
    spec = make_spec(mode="corr", layout="NHWC", bias=True, activation="relu", **flags)
    avx2 = cpu.kvec_heuristic(spec, resolve_target("llvm:znver3"))
    assert avx2.flat and not avx2.k_inner and (avx2.nkv, avx2.pw, avx2.wide) == tile
    assert not cpu.kvec_heuristic(spec, resolve_target("llvm:znver4")).flat
    pointwise = make_spec(mode="corr", input="1x7x7x2048", kernel="512x1x1x2048",
                          layout="NHWC")
    assert not cpu.kvec_heuristic(pointwise, resolve_target("llvm:znver3")).flat


@pytest.mark.parametrize("mode", ["conv", "corr"])
@pytest.mark.parametrize("flags", [
    # 2 images of 3 x 6 outputs (18 -> 20 pixels each), a residual and ReLU
    dict(input="2x6x11x16", kernel="32x3x3x16", padding=1, stride=2, residual=True,
         activation="relu"),
    # asymmetric pads and a 1x1 at stride 2
    dict(input="1x9x9x16", kernel="16x1x1x16", padding=[0, 1, 1, 0], stride=2),
    # 3-D: the last two spatial axes flat, depth outside
    dict(input="1x3x5x7x8", kernel="16x2x3x3x8", padding=1),
], ids=["2d-residual", "1x1-asymmetric", "3d"])
def test_kvec_flat_pixels_are_correct(mode, flags, tmp_path):
    """Flat pixels (`KvecKnobs.flat`): the tile runs across row ends and past the last
    pixel (repeated, then cropped), and "out" unflattens, against the references."""
    spec = make_spec(mode=mode, layout="channels_last", bias=True, **flags)
    pixels = spec.out_size[-2] * spec.out_size[-1]
    knobs = cpu.KvecKnobs(lanes=8, nkv=2, pw=4, wide=-pixels % 4, flat=True)
    assert knobs.wide  # the tile runs past the image's last pixel
    art = build_artifact(spec, resolve_target("llvm:znver3"), tmp_path, verify=True,
                         template="cpu_kvec", knobs=dataclasses.asdict(knobs))
    assert art.manifest.verification.passed


@pytest.mark.parametrize("mode", ["conv", "corr"])
def test_kvec_12_accumulators_on_a_widened_row_are_correct(mode, tmp_path):
    """2 x 6 on a 3x3 stride-2 row of 11 outputs widened to 12 (AVX2 code), the crop
    and the epilogue in the write-back, against the references."""
    spec = make_spec(mode=mode, input="1x7x22x16", kernel="32x3x3x16", padding=1,
                     stride=2, layout="NHWC", bias=True, residual=True, activation="relu")
    knobs = cpu.KvecKnobs(lanes=8, nkv=2, pw=6, k_inner=False, wide=1)
    assert 1 in cpu._kvec_widenings(spec)
    art = build_artifact(spec, resolve_target("llvm:znver3"), tmp_path, verify=True,
                         template="cpu_kvec", knobs=dataclasses.asdict(knobs))
    assert art.manifest.verification.passed


def test_kvec_pointwise_blocks_outside_the_rows_take_4x3_on_16_registers():
    """A 1x1 layer with its channel blocks outside the rows writes each block's
    channels of every output pixel: on 16 registers 4 vectors (two lines per pixel)
    by 3 pixels, the row widened to a multiple of 3 where that loses at most one
    output in eight. Not with the blocks inside the rows, nor for a window (a 3x3
    layer's block weights stream from L2), nor with 32 registers."""
    avx2, avx512 = resolve_target("llvm:znver3"), resolve_target("llvm:znver4")
    spec = make_spec(mode="corr", input="1x28x28x128", kernel="512x1x1x128",
                     layout="NHWC", residual=True)
    tile = cpu.kvec_heuristic(spec, avx2)
    assert (tile.nkv, tile.pw, tile.wide, tile.k_inner) == (4, 3, 2, False)
    tile = cpu.kvec_heuristic(spec, avx512)
    assert (tile.nkv, tile.pw, tile.wide) == (4, 4, 0)
    inside = make_spec(mode="corr", input="1x56x56x16", kernel="64x1x1x16", layout="NHWC")
    tile = cpu.kvec_heuristic(inside, avx2)
    assert tile.k_inner and (tile.nkv, tile.pw) == (2, 4)
    window = make_spec(mode="corr", input="1x56x56x128", kernel="128x3x3x128", padding=1,
                       stride=2, layout="NHWC")
    assert cpu.kvec_heuristic(window, avx2).nkv == 2


def _loops_with_fmas(asm: str) -> list[tuple[int, int]]:
    """(FMAs, vector register stack accesses) of every single-block loop of x86
    assembly that has FMAs: the reduction loops of a register tile."""
    import re

    lines, found = asm.splitlines(), []
    for i, line in enumerate(lines):
        label = re.match(r"^(\.LBB\w+):", line)
        if not label:
            continue
        body = []
        for x in lines[i + 1:]:
            if re.match(r"^\.LBB\w+:", x):
                body = []
                break
            body.append(x)
            if re.search(rf"\bj\w+\s+{re.escape(label.group(1))}\b", x):
                break
        fmas = sum("vfmadd" in x for x in body)
        if fmas:
            found.append((fmas, sum("mm" in x and "(%rsp)" in x for x in body)))
    return found


def test_kvec_4x3_on_16_registers_keeps_its_accumulators_in_registers():
    """4 x 3 on 16 registers runs its pixels inner (12 accumulators, 3 broadcasts and
    a weight vector): its reduction loop touches no vector on the stack. (Channel
    vectors inner, 17 vectors live, LLVM spilled there.)"""
    import tvm

    from convgen.compiler.build import lower
    from convgen.compiler.compute import RUN_PACKED_ENTRY

    avx2 = resolve_target("llvm:znver3")
    spec = make_spec(mode="corr", input="1x28x28x128", kernel="512x1x1x128",
                     layout="NHWC", bias=True, residual=True, activation="relu")
    knobs = cpu.KvecKnobs(lanes=8, nkv=4, pw=3, wide=2)
    mod, _, _ = lower(spec, avx2, "cpu_kvec", dataclasses.asdict(knobs))
    lib = tvm.compile(tvm.IRModule({"main": mod[RUN_PACKED_ENTRY]}),
                      target=avx2.tvm_target())
    loops = _loops_with_fmas(lib.mod.inspect_source("s"))
    assert loops and all(fmas % 12 == 0 for fmas, _ in loops)
    assert all(stack == 0 for _, stack in loops), loops


@pytest.mark.parametrize("mode", ["corr", "conv"])
@pytest.mark.parametrize(("kernel", "knobs"), [
    ("32x1x1x16", cpu.KvecKnobs(lanes=8, nkv=4, pw=3, wide=1)),  # pixels inner
    ("40x3x3x16", cpu.KvecKnobs(lanes=8, nkv=5, pw=2, k_inner=True)),
])
def test_kvec_pixels_inner_computes_right_on_16_registers(mode, kernel, knobs, tmp_path):
    """Tiles of more channel vectors than pixels, built for a 16-register CPU (their
    FMAs pixels inner), epilogue too, against the oracle and onnxruntime."""
    spec = make_spec(mode=mode, input="1x8x8x16", kernel=kernel, layout="NHWC",
                     padding=1 if "3x3" in kernel else 0, bias=True, residual=True,
                     activation="relu")
    art = build_artifact(spec, resolve_target("llvm:znver3"), tmp_path, verify=True,
                         template="cpu_kvec", knobs=dataclasses.asdict(knobs))
    assert art.manifest.verification.passed


@pytest.mark.parametrize("mode", ["corr", "conv"])
@pytest.mark.parametrize(("channels", "tile_shape"), [(24, (3, 4)), (40, (5, 2))])
def test_kvec_on_16_registers_takes_odd_vector_counts_whole(mode, channels, tile_shape,
                                                            tmp_path):
    """16 registers, an odd count of channel vectors (K24: 3, K40: 5): 3 x 4 or 5 x 2
    fills the register file (accumulators, a weight vector each, a broadcast) rather
    than 1 x 8 (a broadcast per FMA); an even count keeps 2 x 4. The tile computes
    right, epilogue too."""
    avx2 = resolve_target("llvm:znver3")
    spec = make_spec(mode=mode, input="1x8x8x16", kernel=f"{channels}x1x1x16",
                     layout="NHWC", bias=True, residual=True)
    tile = cpu.kvec_heuristic(spec, avx2)
    assert (tile.nkv, tile.pw) == tile_shape
    even = cpu.kvec_heuristic(make_spec(mode=mode, input="1x8x8x16", kernel="48x1x1x16",
                                        layout="NHWC"), avx2)
    assert (even.nkv, even.pw) == (2, 4)
    test_template_is_correct(spec, "cpu_kvec", tile, tmp_path)


def test_kvec_single_pixels_take_many_channel_vectors_on_16_registers(tmp_path):
    """A single pixel (a classifier) reuses no weight vector: on 16 registers too it
    takes up to 8 channel vectors, one FMA chain each (K40: 5), not 1 x 1."""
    spec = make_spec(mode="corr", input="1x1x1x64", kernel="40x1x1x64", layout="NHWC",
                     bias=True)
    tile = cpu.kvec_heuristic(spec, resolve_target("llvm:znver3"))
    assert (tile.nkv, tile.pw) == (5, 1)
    test_template_is_correct(spec, "cpu_kvec", tile, tmp_path)


def test_kvec_channel_blocks_inside_rows_where_weights_are_small():
    """Depthwise weights stay in cache: the channel blocks run inside each row; with
    too few rows to share among the cores, they do not; nor for weights that do not
    fit (and tuning does not try them past L2); a stem of few input channels does."""
    depthwise = make_spec(mode="corr", input="1x56x56x144", kernel="144x3x3x1", padding=1,
                          groups=144, layout="NHWC")
    few_rows = make_spec(mode="corr", input="1x2x7x144", kernel="144x3x3x1", padding=1,
                         groups=144, layout="NHWC")
    assert cpu.kvec_heuristic(depthwise, TARGET).k_inner
    assert not cpu.kvec_heuristic(few_rows, TARGET).k_inner
    big = make_spec(mode="corr", input="1x56x56x512", kernel="512x1x1x512", layout="NHWC")
    assert not cpu.kvec_heuristic(big, TARGET).k_inner
    # a 3-channel stem: outside the rows, every block would pad its own copy of the
    # rows (its 36 KB of weights are past a sixteenth of a 512 KB L2)
    stem = make_spec(mode="corr", input="1x224x224x3", kernel="64x7x7x3", padding=3,
                     stride=2, layout="NHWC")
    avx2 = resolve_target("llvm:znver3")
    assert stem.weight_bytes > avx2.l2_bytes // 16
    assert cpu.kvec_heuristic(stem, avx2).k_inner
    # tuning may try the blocks inside the rows up to weights of L2's size, not past it
    k = TARGET.l2_bytes // (4 * 256)
    at_l2, past_l2 = (make_spec(mode="corr", input="1x14x14x256", kernel=f"{n}x1x1x256",
                                layout="NHWC") for n in (k, 2 * k))
    assert at_l2.weight_bytes == TARGET.l2_bytes
    assert any(knobs.k_inner for knobs in cpu._kvec_grid(at_l2, TARGET))
    assert not any(knobs.k_inner for knobs in cpu._kvec_grid(past_l2, TARGET))


def _run_packed_ir(spec: ConvSpec, template: str, knobs: object) -> str:
    """The LLVM IR of a template's run-packed entry (what a bound kernel calls)."""
    import tvm

    from convgen.compiler.build import lower
    from convgen.compiler.compute import RUN_PACKED_ENTRY

    mod, _, _ = lower(spec, TARGET, template, dataclasses.asdict(knobs))
    lib = tvm.compile(tvm.IRModule({"main": mod[RUN_PACKED_ENTRY]}),
                      target=TARGET.tvm_target())
    return lib.mod.inspect_source("ll")


@pytest.mark.parametrize(("template", "knobs", "prefetched"), [
    ("cpu_kvec", cpu.KvecKnobs(lanes=16, nkv=2, pw=4), True),  # 8 x 64 B accumulators
    ("cpu_kvec", cpu.KvecKnobs(lanes=16, nkv=2, pw=8), False),  # 16: 1 KB
    ("cpu_winograd", winograd.WinogradKnobs(tile=2, lanes=16, nkv=1, pt=8), True),
    ("cpu_winograd", winograd.WinogradKnobs(tile=2, lanes=16, nkv=2, pt=8), False),
])
def test_register_tiles_prefetch_their_weights_where_the_accumulators_stay_in_registers(
        template, knobs, prefetched):
    """A tile whose accumulators fit a stack array prefetches its weights in the
    reduction loop; a larger one (a workspace allocation, which LLVM cannot tell
    apart from the weights' memory) must not, or every accumulator is stored at
    every step."""
    window = "3x3" if template == "cpu_winograd" else "1x1"
    spec = make_spec(mode="corr", input="1x8x8x64", kernel=f"64x{window}x64",
                     padding=1 if window == "3x3" else 0, layout="NHWC", bias=True,
                     activation="relu")
    ir = _run_packed_ir(spec, template, knobs)
    assert ("@llvm.prefetch" in ir) == prefetched
    if template == "cpu_kvec":
        # a 1x1 layer's only buffer is the accumulator tile: a stack array, or 1 KB
        # of workspace
        assert ("load ptr, ptr @__TVMBackendAllocWorkspace" in ir) != prefetched


def _prefetched_lines(func, iterations: range) -> set[int]:
    """The lines (lane vectors) of the packed weight that these iterations of the
    parallel loop prefetch, over all their serial steps."""
    offsets, lanes = _prefetched_offsets(func, iterations)
    return {flat // lanes for flat in offsets}


def _prefetched_offsets(func, iterations: range) -> tuple[list[int], int]:
    """Every prefetch these iterations of the parallel loop run, over all their serial
    steps, as an offset into the packed weight (in elements); and its lanes."""
    import itertools

    import tvm_ffi
    from tvm import tirx
    from tvm.ir.expr import TensorLoad
    from tvm.sym.analyzer import Analyzer

    stack, calls = [], []

    def on_for(node, visitor):
        stack.append(node)
        visitor.default_visit(node)
        stack.pop()

    def on_call(node, visitor):
        if "prefetch" in str(node):
            loads = []
            tvm_ffi.structural_walk(node, (TensorLoad, loads.append))
            calls.append((loads[0], list(stack)))
        visitor.default_visit(node)

    tvm_ffi.structural_visit(func.body, [(tirx.For, on_for), (tirx.Evaluate, on_call)])
    offsets, analyzer, lanes = [], Analyzer(), 0
    for load, loops in calls:
        weight = load.source
        par = next(lp for lp in loops if lp.kind == tirx.ForKind.PARALLEL)
        serial = loops[loops.index(par) + 1:]  # (serial or unrolled, around the call)
        shape = [int(d) for d in weight.shape]
        for values in itertools.product(*(range(int(lp.extent)) for lp in serial)):
            for p in iterations:
                # (each loop's min plus an offset: a constant of the loop variable's type)
                at = {par.loop_var: par.min + p,
                      **{lp.loop_var: lp.min + v for lp, v in zip(serial, values)}}
                idx = [int(analyzer.simplify(tvm_ffi.structural_map(
                    i, (tirx.Var, lambda v, at=at: next(
                        (x for k, x in at.items() if k.same_as(v)), v))))) for i in load.indices]
                flat = 0
                for dim, i in zip(shape, idx):
                    flat = flat * dim + i
                offsets.append(flat)
                lanes = shape[-1]
    return offsets, lanes


@pytest.mark.parametrize(("template", "knobs", "run", "run_lines"), [
    # a channel block (2 vectors x 64 input channels) per 8 output rows
    ("cpu_kvec", cpu.KvecKnobs(lanes=16, nkv=2, pw=4, k_inner=False), 8, 2 * 64),
    # a plane of U (4 vectors x 64 input channels) per 2 blocks of 8 of the 16 tiles
    ("cpu_winograd", winograd.WinogradKnobs(tile=2, lanes=16, nkv=1, pt=8), 2, 4 * 64),
])
def test_runs_reading_the_same_weights_prefetch_the_next_runs(template, knobs, run,
                                                              run_lines):
    """Consecutive parallel iterations that read the same weights (a channel block's
    rows with the blocks outside the rows; a Winograd plane's tile blocks) together
    prefetch every line of the next run's weights, and nothing else: no stream
    prefetch of their own, which the run's first iteration would wait on memory for.
    With the blocks inside the rows every row reads all the weights, and the tile
    prefetches ahead in its stream."""
    from convgen.compiler.build import lower
    from convgen.compiler.compute import RUN_PACKED_ENTRY

    window = "3x3" if template == "cpu_winograd" else "1x1"
    spec = make_spec(mode="corr", input="1x8x8x64", kernel=f"64x{window}x64",
                     padding=1 if window == "3x3" else 0, layout="NHWC")
    mod, _, _ = lower(spec, TARGET, template, dataclasses.asdict(knobs))
    lines = _prefetched_lines(mod[RUN_PACKED_ENTRY], range(run))
    assert lines == set(range(run_lines, 2 * run_lines))
    if template == "cpu_kvec":
        ir = _run_packed_ir(spec, template, dataclasses.replace(knobs, k_inner=True))
        assert "@llvm.prefetch" in ir


def test_runs_prefetch_each_line_of_the_next_run_once_per_block_of_steps():
    """Where a run has many steps per line of the next run's weights, one prefetch per
    cache line, once per block of steps, rather than one at every step: an 8-lane
    (AVX2) tile's step is 8 FMAs, and a prefetch at each, with its address arithmetic,
    held a 1x1 layer to 0.74 ms against 0.62 without (Zen 4, AVX2 code). Two 8-lane
    vectors share a 64-byte line: one prefetch covers both."""
    from convgen.compiler.build import lower
    from convgen.compiler.compute import RUN_PACKED_ENTRY

    avx2 = resolve_target("llvm:znver3")
    spec = make_spec(mode="corr", input="1x8x8x64", kernel="64x1x1x64", layout="NHWC")
    knobs = cpu.KvecKnobs(lanes=8, nkv=2, pw=4, k_inner=False)
    mod, _, _ = lower(spec, avx2, "cpu_kvec", dataclasses.asdict(knobs))
    # a run: one block of 2 x 8 channels, its 8 rows of 2 tiles by 64 input channels
    # (1024 steps), reading 2 x 64 vectors of 32 bytes (4 KB, 64 lines)
    offsets, lanes = _prefetched_offsets(mod[RUN_PACKED_ENTRY], range(8))
    assert lanes == 8
    line = avx2.cache_line_bytes // 4
    assert sorted(flat // line for flat in offsets) == list(range(64, 128))


def test_stream_prefetches_come_once_per_cache_line():
    """A tile prefetching ahead in its own stream reads one 8-lane (32-byte) vector of
    each stream per step: one prefetch per 64-byte line, every other step, not two."""
    from convgen.compiler.build import lower
    from convgen.compiler.compute import RUN_PACKED_ENTRY

    avx2 = resolve_target("llvm:znver3")
    # one channel block (2 x 8 channels) and one tile (4 pixels) per row: each row's
    # steps read each stream once
    spec = make_spec(mode="corr", input="1x4x4x64", kernel="16x1x1x64", layout="NHWC")
    knobs = cpu.KvecKnobs(lanes=8, nkv=2, pw=4, k_inner=True)
    mod, _, _ = lower(spec, avx2, "cpu_kvec", dataclasses.asdict(knobs))
    offsets, _ = _prefetched_offsets(mod[RUN_PACKED_ENTRY], range(1))
    line = avx2.cache_line_bytes // 4
    assert len(offsets) == 2 * 64 // 2  # two streams, 64 steps, every other step
    assert len({flat // line for flat in offsets}) == len(offsets)


def _own_stream_prefetched(spec, knobs: cpu.KvecKnobs, block_bytes: int) -> bool:
    """Whether the first channel block's rows prefetch its own lines (ahead of their
    loads in its stream) rather than the next block's."""
    from convgen.compiler.build import lower
    from convgen.compiler.compute import RUN_PACKED_ENTRY

    mod, _, _ = lower(spec, TARGET, "cpu_kvec", dataclasses.asdict(knobs))
    lines = _prefetched_lines(mod[RUN_PACKED_ENTRY], range(1))
    return bool(lines) and min(lines) < block_bytes // 64


def test_runs_whose_weights_fill_l2_prefetch_in_their_stream():
    """Two runs' weights beyond L2: prefetching the next block would evict the lines
    this block's rows reread (as on ResNet-50's C512 14x14 3x3 stride 2, 2 x 16
    channels: 589 KB per block), so the tile prefetches ahead in its own stream."""
    per_channel = 2 * 16 * 4  # a block's bytes per input channel: 2 x 16 lanes, 1x1
    c = (TARGET.l2_bytes // (2 * per_channel) // 16 + 1) * 16  # two blocks just past L2
    spec = make_spec(mode="corr", input=f"1x8x8x{c}", kernel=f"64x1x1x{c}", layout="NHWC")
    assert 2 * per_channel * c > TARGET.l2_bytes
    knobs = cpu.KvecKnobs(lanes=16, nkv=2, pw=4, k_inner=False)
    assert _own_stream_prefetched(spec, knobs, per_channel * c)


def test_runs_over_a_windows_taps_prefetch_in_their_stream():
    """A 3x3 layer's rows step through the input channels once per tap (unrolled):
    a few FMAs per step, where prefetching the next block cost more than it hid
    (ResNet-50's C256 28x28 3x3 stride 2, 1 x 7: 1.38 against 1.20 ms after other
    traffic), so the rows prefetch in their own stream although two blocks fit L2."""
    spec = make_spec(mode="corr", input="1x8x8x64", kernel="64x3x3x64", padding=1,
                     layout="NHWC")
    knobs = cpu.KvecKnobs(lanes=16, nkv=2, pw=4, k_inner=False)
    block_bytes = 2 * 16 * 9 * 64 * 4
    assert 2 * block_bytes <= TARGET.l2_bytes
    assert _own_stream_prefetched(spec, knobs, block_bytes)


@pytest.mark.parametrize("mode", ["conv", "corr"])
def test_kvec_pads_each_row_where_a_strided_window_copies_it_at_most_twice(mode, tmp_path):
    """With the channel blocks inside the rows, a dense stride-2 3x3 layer pads the
    input rows each output row reads, in its own task (2 copies of each row), rather
    than the whole input up front; stride 1 (3 copies) and the 3-channel stem keep
    the pass up front. Padded per row, the kernel must still be right, in both modes
    and with asymmetric padding."""
    strided = make_spec(mode=mode, input="1x13x12x32", kernel="32x3x3x32",
                        padding=[1, 0, 1, 1], stride=2, layout="NHWC", bias=True)
    knobs = cpu.KvecKnobs(lanes=16, nkv=1, pw=6, k_inner=True)
    assert cpu._kvec_pad_at(strided, TARGET, knobs) == "tile"
    unit = make_spec(mode=mode, input="1x12x12x32", kernel="32x3x3x32", padding=1,
                     layout="NHWC")
    stem = make_spec(mode=mode, input="1x32x32x3", kernel="64x7x7x3", padding=3, stride=2,
                     layout="NHWC")
    assert cpu._kvec_pad_at(unit, TARGET, knobs) == "front"
    assert cpu._kvec_pad_at(stem, TARGET, knobs) == "front"
    assert cpu._kvec_pad_at(strided, TARGET, dataclasses.replace(knobs, k_inner=False)) \
        == "front"
    test_template_is_correct(strided, "cpu_kvec", knobs, tmp_path)


@pytest.mark.parametrize("mode", ["conv", "corr"])
def test_kvec_copies_a_narrow_group_slice_in_the_tile(mode, tmp_path):
    """A grouped layer whose blocks run outside the rows, each group's channels at
    most two cache lines of a wide pixel (ResNeXt's 32 groups of 16), copies its own
    slice of the rows it reads in the tile rather than reading it in place from a
    copy of the whole padded input; wide groups (2 of 128) and blocks inside the
    rows keep the pass up front. The copy must be right in both modes, with
    asymmetric padding and stride 2."""
    narrow = make_spec(mode=mode, input="1x13x14x512", kernel="512x3x3x16",
                       padding=[1, 0, 1, 1], stride=2, groups=32, layout="NHWC", bias=True)
    wide = make_spec(mode=mode, input="1x14x14x256", kernel="256x3x3x128", padding=1,
                     groups=2, layout="NHWC")
    knobs = cpu.KvecKnobs(lanes=16, nkv=1, pw=7, k_inner=False)
    assert cpu._kvec_pad_at(narrow, TARGET, knobs) == "tile"
    assert cpu._kvec_pad_at(wide, TARGET, knobs) == "front"
    assert cpu._kvec_pad_at(narrow, TARGET, dataclasses.replace(knobs, k_inner=True)) \
        != "tile"
    test_template_is_correct(narrow, "cpu_kvec", knobs, tmp_path)


def test_kvec_tiles_of_streaming_weights_fit_a_stack_array():
    """Weights larger than L2 come from memory in a model: the heuristic's tile then
    stays under the stack limit, so it prefetches them (`prefetch.py`), still with
    enough chains for the FMA pipes; weights that stay in cache keep 4 x 4."""
    from convgen.compiler.schedule.prefetch import accumulator_scope

    avx512 = resolve_target("llvm:znver4")
    streaming = make_spec(mode="corr", input="1x28x28x512", kernel="1024x1x1x512",
                          layout="NHWC")
    assert streaming.weight_bytes > avx512.l2_bytes
    tile = cpu.kvec_heuristic(streaming, avx512)
    assert accumulator_scope(tile.nkv * tile.pw * tile.lanes * 4) == "global"
    assert tile.nkv * tile.pw >= cpu.FMA_CHAINS
    cached = make_spec(mode="corr", input="1x28x28x256", kernel="256x1x1x256", layout="NHWC")
    assert (cpu.kvec_heuristic(cached, avx512).nkv, cpu.kvec_heuristic(cached, avx512).pw) \
        == (4, 4)
