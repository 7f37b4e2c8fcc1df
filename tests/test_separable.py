"""A depthwise layer and the 1 x 1 layer that reads it as one CPU kernel
(`schedule/separable.py`), against the two layers computed one after the other by the
numpy oracle: strides, dilation, residual, both modes, rows that the tiles do not
divide, batch 2, the tiles a 256-bit and the host's vector width choose; the pairs it
declines, with their reason; and where fusing pays."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convgen.compiler.compute import pack_prim_func
from convgen.compiler.schedule import separable
from convgen.compiler.targets import resolve_target
from convgen.reference import reference_conv
from convgen.spec import ConvSpec, make_spec

HOST = resolve_target("llvm")
# (znver5: 512-bit FMA units, so a 1 x 1 stage of K24 takes 16-lane vectors padded to 32)
KNOB_TARGETS = {"host": HOST, "znver3": resolve_target("llvm:znver3"),
                "znver5": resolve_target("llvm:znver5")}

# (input N x H x W x C, depthwise stride, pointwise output channels, residual, activation,
#  depthwise dilation)
CASES = [
    ("1x10x10x48", 1, 8, True, "relu6", 1),
    ("1x9x7x32", 2, 16, False, "relu", 1),
    ("2x6x5x16", 1, 24, True, "none", 1),
    ("1x7x7x64", 1, 32, False, "hardswish", 1),
    ("1x9x8x16", 1, 16, False, "relu6", 2),
    # znver5: one 11-wide row of K24 as 1 x 11 tiles in two 16-lane blocks, the second
    # cropped to 8 channels (the weights' prefetch must come after the depthwise row)
    ("1x3x11x8", 1, 24, False, "none", 1),
]


def _pair(shape: str, stride: int, k: int, residual: bool, activation: str, dilation: int,
          mode: str) -> tuple[ConvSpec, ConvSpec]:
    n, *_, c = (int(v) for v in shape.split("x"))
    dw = make_spec(mode=mode, input=shape, kernel=f"{c}x3x3x1", groups=c, stride=stride,
                   dilation=dilation, padding=dilation, layout="NHWC", bias=True,
                   activation=activation)
    oh, ow = dw.out_size
    pw = make_spec(mode=mode, input=f"{n}x{oh}x{ow}x{c}", kernel=f"{k}x1x1x{c}",
                   layout="NHWC", bias=True, residual=residual)
    return dw, pw


def _packed(spec: ConvSpec, packing: object, weight: np.ndarray) -> object:
    import tvm

    func = pack_prim_func(spec, HOST, packing).with_attr("global_symbol", "pack")
    lib = tvm.compile(tvm.IRModule({"pack": func}), target=HOST.tvm_target())
    out = tvm.runtime.empty(packing.packed_shape(spec), spec.dtype)
    lib["pack"](tvm.runtime.tensor(weight), out)
    return out


def _check_pair(dw: ConvSpec, pw: ConvSpec, target: object, seed: int) -> np.ndarray:
    """The fused kernel's output, asserted against the two layers apart (oracle)."""
    import tvm

    knobs = separable.knobs(dw, pw, target, None, None)
    func, dw_packing, pw_packing = separable.prim_func(dw, pw, target, knobs)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=HOST.tvm_target())
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(dw.data_shape).astype(np.float32)
    w1 = rng.standard_normal(dw.weight_shape).astype(np.float32)  # asymmetric taps
    b1 = rng.standard_normal(dw.out_channels).astype(np.float32)
    w2 = (rng.standard_normal(pw.weight_shape) / np.sqrt(pw.in_channels)).astype(np.float32)
    b2 = rng.standard_normal(pw.out_channels).astype(np.float32)
    res = [rng.standard_normal(pw.out_shape).astype(np.float32)] if pw.residual else []
    args = [tvm.runtime.tensor(x), _packed(dw, dw_packing, w1), tvm.runtime.tensor(b1),
            _packed(pw, pw_packing, w2), tvm.runtime.tensor(b2),
            *(tvm.runtime.tensor(r) for r in res)]
    out = tvm.runtime.tensor(np.zeros(pw.out_shape, np.float32))
    lib["main"](*args, out)
    want = reference_conv(pw, reference_conv(dw, x, w1, b1), w2, b2, *res)
    got = out.numpy()
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())
    return got


@st.composite
def pairs(draw: st.DrawFn) -> tuple[ConvSpec, ConvSpec]:
    """Random pairs `deploy` would fuse: the depthwise channels in whole half vectors of
    256-bit registers, any number of 1 x 1 output channels (padded to whole vectors
    where `channel_pad` pays), strides, dilations, odd rows, batch, any epilogue."""
    n, h, w = draw(st.integers(1, 2)), draw(st.integers(3, 12)), draw(st.integers(3, 12))
    c, k = 8 * draw(st.integers(1, 6)), draw(st.integers(1, 48))
    stride, dilation = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    dw = make_spec(mode=draw(st.sampled_from(["corr", "conv"])), input=f"{n}x{h}x{w}x{c}",
                   kernel=f"{c}x3x3x1", groups=c, stride=stride, dilation=dilation,
                   padding=dilation, layout="NHWC", bias=True,
                   activation=draw(st.sampled_from(["none", "relu", "relu6", "silu"])))
    oh, ow = dw.out_size
    pw = make_spec(mode=dw.mode, input=f"{n}x{oh}x{ow}x{c}", kernel=f"{k}x1x1x{c}",
                   layout="NHWC", bias=True, residual=draw(st.booleans()))
    return dw, pw


@settings(max_examples=12, deadline=None)
@given(pair=pairs(), seed=st.integers(0, 2**16))
def test_random_pairs_match_the_two_layers_apart(pair, seed):
    dw, pw = pair  # (rows of at least 3 inputs: 2 or more output pixels, never declined)
    assert dw.out_size[-1] > 1 and separable.declines(dw, pw, HOST) is None
    _check_pair(dw, pw, HOST, seed)


@pytest.mark.parametrize("knob_target", list(KNOB_TARGETS))
@pytest.mark.parametrize("mode", ["corr", "conv"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_pair_matches_the_two_layers_apart(case, mode, knob_target):
    dw, pw = _pair(*case, mode=mode)
    target = KNOB_TARGETS[knob_target]
    assert separable.declines(dw, pw, target) is None
    got = _check_pair(dw, pw, target, seed=7)
    if mode == "conv":  # the depthwise taps were flipped: corr's result (same inputs) differs
        plain = _check_pair(*_pair(*case, mode="corr"), target, seed=7)
        assert np.abs(got - plain).max() > 1e-3


def test_a_pointwise_stage_past_k_matches_the_two_layers_apart():
    """A 1 x 1 stage whose vectors reach past K (Zen 5's K24 at 16 lanes, and K12 at
    whole vectors on AVX2 as on AVX-512) computes the extra channels on zero weights
    and crops them in its write-back."""
    for shape, k, target in [("1x9x7x32", 24, resolve_target("llvm:znver5")),
                             ("1x6x11x16", 12, resolve_target("llvm:znver3"))]:
        dw, pw = _pair(shape, 1, k, True, "relu6", 1, mode="conv")
        assert separable.declines(dw, pw, target) is None
        knobs = separable.knobs(dw, pw, target, None, None)
        assert knobs.lanes == target.fp32_lanes and k % knobs.lanes
        _check_pair(dw, pw, target, seed=3)


@pytest.mark.parametrize("change, reason", [
    (dict(layout="NCHW"), "channels-last"),
    (dict(pointwise_kernel="3x3"), "not a dense 1 x 1"),
    (dict(c=6), "depthwise channels not a multiple of half a vector"),
    (dict(dw_residual=True), "not depthwise, or adds a residual"),
    (dict(size=2), "rows of one pixel"),
])
def test_pairs_it_declines_say_why(change, reason):
    layout = change.get("layout", "NHWC")
    nhwc = layout == "NHWC"
    c, size = change.get("c", 32), change.get("size", 8)
    stride = 1 if size > 2 else 2  # 2 x 2 -> one pixel
    dw = make_spec(mode="corr", input=f"1x{size}x{size}x{c}" if nhwc else f"1x{c}x{size}x{size}",
                   kernel=f"{c}x3x3x1" if nhwc else f"{c}x1x3x3", groups=c, padding=1,
                   stride=stride, layout=layout, residual=change.get("dw_residual", False))
    r = 3 if change.get("pointwise_kernel") == "3x3" else 1
    out = "x".join(map(str, dw.out_size))
    pw = make_spec(mode="corr", input=f"1x{out}x{c}" if nhwc else f"1x{c}x{out}",
                   kernel=f"16x{r}x{r}x{c}" if nhwc else f"16x{c}x{r}x{r}",
                   padding=r // 2, layout=layout)
    why = separable.declines(dw, pw, HOST)
    assert why is not None and reason in why


def _mobilenet_pair(channels: int, size: int, k: int, rows: int = 0) -> tuple[ConvSpec, ConvSpec]:
    return _pair(f"1x{rows or size}x{size}x{channels}", 1, k, True, "relu6", 1, mode="corr")


@pytest.mark.parametrize("channels, size, k, pays_on_16", [
    (576, 14, 96, False),  # 1 x 7 on 14-wide rows, 451 KB between: apart
    (960, 7, 160, False),  # 1 x 7, 188 KB
    (144, 56, 24, True),  # 3 x 4 on 56-wide rows
    (192, 28, 32, True),  # 2 x 4
])
def test_fusing_pays_with_enough_fma_chains_or_an_intermediate_past_l2(channels, size, k,
                                                                        pays_on_16):
    """MobileNetV2's pairs: with 16 registers, one whose 1 x 1 row tile keeps fewer than
    8 FMA chains and whose depthwise output fits L2 runs apart; the same pair with its
    depthwise output past L2 (a taller image, the same rows) is fused anyway; with 32
    registers every pair is fused."""
    dw, pw = _mobilenet_pair(channels, size, k)
    for name, target in [("znver3", resolve_target("llvm:znver3")),
                         ("znver4", resolve_target("llvm:znver4"))]:
        assert separable.declines(dw, pw, target) is None
        knobs = separable.knobs(dw, pw, target, None, None)
        assert separable.pays(dw, target, knobs) is (pays_on_16 or name == "znver4")
    if not pays_on_16:
        big_dw, big_pw = _mobilenet_pair(channels, size, k, rows=8 * size)
        znver3 = resolve_target("llvm:znver3")
        knobs = separable.knobs(big_dw, big_pw, znver3, None, None)
        assert knobs.nkv * knobs.pw < 8 and separable.pays(big_dw, znver3, knobs)
