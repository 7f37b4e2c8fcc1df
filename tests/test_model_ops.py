"""The generic schedule `deploy` gives a model's other operators: correct against
numpy, and vectorized where a loop allows it (layout transposes included)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import tvm
from tvm import te

from convgen.compiler.schedule.model_ops import schedule_model_ops
from convgen.compiler.targets import resolve_target

TARGET = resolve_target("llvm")


def _run(tensors: list, inputs: list[np.ndarray], asm: bool = False) -> tuple[Any, ...]:
    func = te.create_prim_func(tensors).with_attr("global_symbol", "op")
    target = TARGET.tvm_target()
    with target:
        mod = schedule_model_ops()(tvm.IRModule({"op": func}))
    lib = tvm.compile(mod, target=target)
    out = tvm.runtime.tensor(np.zeros([int(d) for d in tensors[-1].shape], "float32"))
    lib["op"](*[tvm.runtime.tensor(a) for a in inputs], out)
    if asm:
        return out.numpy(), mod.script(), lib.mod.inspect_source("asm")
    return out.numpy(), mod.script()


@pytest.mark.parametrize("shape", [(1, 3, 224, 224), (2, 5, 7, 16), (1, 3, 5, 6)])
def test_transpose_to_channels_last(shape):
    """Few channels innermost: the nest in the output's order, the channel loop
    unrolled and no TVM vector (whose lanes would be stored apart), so that LLVM's
    loop vectorizer turns the pixel loop into whole-vector loads of each channel's
    plane, shuffled into whole-vector stores; in parallel where it is large."""
    a = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    x = te.placeholder(shape, name="x")
    n, c, h, w = shape
    y = te.compute((n, h, w, c), lambda b, y0, x0, ch: x[b, ch, y0, x0], name="T")
    got, script, asm = _run([x, y], [a], asm=True)
    np.testing.assert_array_equal(got, a.transpose(0, 2, 3, 1))
    assert "T.vectorized" not in script
    assert f"T.unroll({c})" in script
    assert ("T.parallel" in script) == (a.size >= 1 << 17)
    if w >= 8:  # LLVM's vectors: whole-register stores into the output
        assert re.search(r"vmovup[sd]\s+%[xyz]mm\d+, -?\w*\(", asm), "no vector stores"


def test_transpose_to_many_channels_last():
    """More channels than LLVM interleaves, none a vector divides (ShuffleNetV2's 58):
    the row, contiguous in the input, moves inside and is vectorized, its lanes
    stored apart, rather than every element read alone."""
    shape = (1, 58, 28, 28)
    a = np.random.default_rng(3).standard_normal(shape, dtype=np.float32)
    x = te.placeholder(shape, name="x")
    y = te.compute((1, 28, 28, 58), lambda b, y0, x0, ch: x[b, ch, y0, x0], name="T")
    got, script = _run([x, y], [a])
    np.testing.assert_array_equal(got, a.transpose(0, 2, 3, 1))
    assert "T.vectorized" in script


@pytest.mark.parametrize(("shape", "line"), [
    ((1, 56, 56, 256), 16), ((2, 6, 8, 32), 16), ((1, 28, 32, 21), 7), ((1, 5, 7, 16), None)])
def test_transpose_to_channels_first(shape, line):
    """A model's channels-last output back to NCHW: vectors along the output row, each
    gathering one channel of 8 pixels, with a cache line of channels (or the largest
    divisor of the channels below it) unrolled inside, so that the gathered lines
    serve the next vectors from L1, and the rest in parallel where it is large; a row
    no vector divides stays as it was."""
    a = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    x = te.placeholder(shape, name="x")
    n, h, w, c = shape
    y = te.compute((n, c, h, w), lambda b, ch, y0, x0: x[b, y0, x0, ch], name="T")
    got, script = _run([x, y], [a])
    np.testing.assert_array_equal(got, a.transpose(0, 3, 1, 2))
    assert (f"T.unroll({line})" in script) == (line is not None)
    assert ("T.parallel" in script) == (a.size >= 1 << 17)


@pytest.mark.parametrize("shape", [(1, 28, 28, 64), (1, 56, 56, 64)])
def test_elementwise_add_relu_is_vectorized(shape):
    """Vectorized, and on every core from 128 K elements (a model's operator reads
    what the layers before it left, partly out of cache)."""
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal(shape, dtype=np.float32) for _ in range(2))
    x, z = te.placeholder(a.shape, name="x"), te.placeholder(b.shape, name="z")
    s = te.compute(a.shape, lambda *i: x[i] + z[i], name="add")
    y = te.compute(a.shape, lambda *i: te.max(s[i], 0.0), name="relu")
    got, script = _run([x, z, y], [a, b])
    np.testing.assert_allclose(got, np.maximum(a + b, 0), rtol=1e-6)
    assert "T.vectorized" in script
    assert ("T.parallel" in script) == (a.size >= 1 << 17)


@pytest.mark.parametrize(("channels", "pieces"), [
    ((128, 32, 32, 32), 4),  # DenseNet's: a vector loop per input
    ((20, 12, 8), 3),  # boundaries of 4: vectors of 4
    ((3, 5), 1),  # no vector fits between the boundaries: as before (selects per lane)
])
def test_concatenation_is_vectorized_per_input(channels, pieces):
    """A concatenation on the channels-last axis, then a per-channel scale and shift and
    ReLU (DenseNet's BatchNorm before each convolution), fused as `deploy` fuses them:
    correct, and each input copied by its own vector loop, in which every select is
    decided."""
    from tvm import topi

    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal((1, 5, 7, c), dtype=np.float32) for c in channels]
    scale, shift = (rng.standard_normal(sum(channels), dtype=np.float32) for _ in range(2))
    xs = [te.placeholder(a.shape, name=f"x{i}") for i, a in enumerate(arrays)]
    s, b = te.placeholder(scale.shape, name="s"), te.placeholder(shift.shape, name="b")
    cat = topi.concatenate(xs, axis=3)
    y = te.compute(cat.shape, lambda n, h, w, c: te.max(cat[n, h, w, c] * s[c] + b[c], 0.0))
    got, script = _run([*xs, s, b, y], [*arrays, scale, shift])
    want = np.maximum(np.concatenate(arrays, axis=3).astype(np.float64) * scale + shift, 0)
    # (LLVM contracts x * s + b into an FMA: one rounding, float32's ulp of the terms)
    np.testing.assert_allclose(got, want, rtol=0, atol=4e-7 * np.abs(want).max())
    assert script.count("T.vectorized") == pieces


@pytest.mark.parametrize("channels", [384, 20])
def test_reduction_along_the_contiguous_axis_is_vectorized(channels):
    """LayerNorm over a channels-last pixel's channels: the mean and the variance are
    sums along the innermost, contiguous axis, each kept as a vector of partial sums
    (16 lanes for 384 channels, 4 for 20), then normalised and scaled."""
    rng = np.random.default_rng(4)
    a = rng.standard_normal((1, 5, 7, channels), dtype=np.float32) * 3 + 1
    gamma = rng.standard_normal(channels, dtype=np.float32)
    x, g = te.placeholder(a.shape, name="x"), te.placeholder(gamma.shape, name="g")
    c = te.reduce_axis((0, channels), name="c")
    total = te.compute(a.shape[:3], lambda n, h, w: te.sum(x[n, h, w, c], axis=c), name="s")
    mean = te.compute(a.shape[:3], lambda n, h, w: total[n, h, w] / channels, name="mean")
    d = te.reduce_axis((0, channels), name="d")
    var = te.compute(a.shape[:3], lambda n, h, w: te.sum(
        (x[n, h, w, d] - mean[n, h, w]) * (x[n, h, w, d] - mean[n, h, w]), axis=d), name="v")
    y = te.compute(a.shape, lambda n, h, w, k: (x[n, h, w, k] - mean[n, h, w]) * tvm.tirx.rsqrt(
        var[n, h, w] / channels + 1e-6) * g[k], name="y")
    got, script = _run([x, g, y], [a, gamma])
    a64 = a.astype(np.float64)
    want = (a64 - a64.mean(-1, keepdims=True)) / np.sqrt(a64.var(-1, keepdims=True) + 1e-6) * gamma
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
    assert script.count("_rf") >= 4 and "T.vectorized" in script  # both sums, in vectors


@pytest.mark.parametrize("channels", [144, 32])
def test_gate_computed_once_per_channel(channels):
    """A squeeze-excitation gate, x * sigmoid(s) with s one value per channel, as
    `deploy` fuses it: correct, and the sigmoid in a nest of its own over the channels
    (computed once into a buffer of one value per channel), not inlined into the
    multiply, which would evaluate it for every pixel."""
    from convgen.compiler.compute import sigmoid

    rng = np.random.default_rng(4)
    a = rng.standard_normal((1, 28, 28, channels), dtype=np.float32)
    g = rng.standard_normal((1, 1, 1, channels), dtype=np.float32)
    x, s = te.placeholder(a.shape, name="x"), te.placeholder(g.shape, name="s")
    gate = te.compute(g.shape, lambda *i: sigmoid(s[i]), name="gate")
    y = te.compute(a.shape, lambda n, h, w, c: x[n, h, w, c] * gate[0, 0, 0, c], name="scaled")
    got, script = _run([x, s, y], [a, g])
    np.testing.assert_allclose(got, a / (1 + np.exp(-g.astype(np.float64))), rtol=1e-6)
    assert re.search(rf"gate\w* = T.sblock_alloc_buffer\(\(1, 1, 1, {channels}\)", script)
    assert 'T.sblock("gate")' in script


def test_exp_and_sigmoid_in_vector_arithmetic():
    """`compute.exp` and `compute.sigmoid` (the SiLU epilogue, and `deploy`'s sigmoid
    and exp): within 2e-7 relative of float64 numpy over every input, saturating
    past float32's range, NaN kept, and no call of expf left for LLVM to make per
    lane."""
    from convgen.compiler.compute import exp, sigmoid

    rng = np.random.default_rng(2)
    a = np.concatenate([np.linspace(-120, 120, 4096), rng.standard_normal(4090) * 8,
                        [0.0, -87.3, 88.3, 1e-30, -1e-30, np.nan]]).astype(np.float32)
    x = te.placeholder(a.shape, name="x")
    def applied(fn):  # (te.compute takes no default arguments)
        return te.compute(a.shape, lambda i: fn(x[i]), name=fn.__name__)

    for fn, ref in ((exp, np.exp), (sigmoid, lambda v: 1 / (1 + np.exp(-v)))):
        got, script = _run([x, applied(fn)], [a])
        want = ref(a.astype(np.float64))
        inside = (a > -87.3) & (a < 88.3)  # exp saturates beyond (float32's normal range)
        np.testing.assert_allclose(got[inside], want[inside], rtol=2e-7, atol=0)
        number = ~np.isnan(a)
        assert np.isnan(got[~number]).all()  # NaN propagates, as in libm
        assert np.all(np.isfinite(got[number])) and np.all(got[number] >= 0)
        assert "T.vectorized" in script and ".exp(" not in script and "sigmoid(" not in script
    assert got[a == -120][0] < 1e-37 and got[a == 120][0] == 1.0  # (sigmoid's ends)
