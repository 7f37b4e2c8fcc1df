"""Winograd minimal filtering, F(m x m, 3 x 3): the algorithm (its CPU schedule is
`schedule/winograd.py`).

For 2-D, stride-1, ungrouped 3x3 layers. Each m x m output tile is

    Y = A^T [ U (.) V ] A,   U = G g G^T (per output and input channel),
                             V = B^T d B (d: the alpha x alpha input tile, alpha = m + 2)

summed over the input channels, which makes the element-wise product alpha^2
independent GEMMs (tiles x C times C x K): 9 m^2 multiplications per output
become alpha^2 (F(4x4): 36 for 16 outputs, 4x fewer). U is computed from the
weights once, by the packing entry (`conv`'s flip applied to g there, so both
modes run the same code); the plain entry computes it in the kernel.

Dilated by (dh, dw), the output splits into dh x dw phases (the pixels y = py mod dh,
x = px mod dw), and each phase is an undilated 3x3 convolution of the input pixels of
its own phase: out[py + dh i, px + dw j] = sum_rs in[py + dh (i + r), px + dw (j + s)]
g[r, s] (padded coordinates). So the tiles are m x m tiles of each phase's lattice, and
a tile's alpha x alpha input pixels sit dh and dw apart; the transforms and the GEMM
are the same. (FCN's and DeepLab's layers dilated by 2 and 4 on 28x28: 4 and 16
phases of 14x14 and 7x7.)

A, B and G are Cook-Toom matrices (TVM's `winograd_util`); larger tiles need more
distant interpolation points and lose accuracy, hence a tolerance per tile
(`runtime.verify.ALGORITHM_TOLERANCES`). Every transform is written out as sums of its non-zero
coefficients (`_combine`), selected by the transform index (`_by_index`): once
the schedule unrolls that index, each output is a handful of adds, with no
multiplications by 0 or 1.

Stages (block names): "pad" (the padded input, channels-last, covering whole
tiles), "wino_bt" and "wino_v" (the input transform, rows then columns), "bgemm"
(the batched GEMM), "wino_at" and "wino_y" (the output transform), "out" (the
crop to the output and the fused epilogue), and "wino_gg" and "wino_u" (the weight
transform, rows then columns, in the plain entry and the packing entry).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from convgen.spec import ConvSpec

TILES = (2, 3, 4, 6)  # m: F(2x2,3x3), F(3x3,3x3), F(4x4,3x3), F(6x6,3x3)


def declines(spec: ConvSpec) -> str | None:
    """Why Winograd does not apply to `spec` (None: it does)."""
    if spec.ndim != 2 or spec.kernel_size != (3, 3):
        return "Winograd here is for 2-D 3x3 kernels"
    if spec.stride != (1, 1):
        return "Winograd needs stride 1"
    if spec.groups != 1:
        return "Winograd here is for ungrouped convolutions"
    if spec.dtype != "float32":
        return "Winograd here is float32 only"
    return None


@functools.cache
def matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, B, G) of F(m, 3): shapes (alpha, m), (alpha, alpha), (alpha, 3), float64."""
    from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points

    return _cook_toom_convolution(_interpolation_points(m + 1), m, 3)


def _combine(coefs: np.ndarray, terms: list[Any]) -> Any:
    """sum_i coefs[i] * terms[i] over the non-zero coefficients, without multiplying
    by +-1."""
    from tvm import tirx

    acc = tirx.const(0.0, "float32")
    first = True
    for c, t in zip(coefs, terms):
        c = float(np.float32(c))
        if c == 0.0:
            continue
        term = t if abs(c) == 1.0 else t * tirx.const(abs(c), "float32")
        if first:  # no add of a leading 0
            acc, first = (-term if c < 0 else term), False
        else:
            acc = acc - term if c < 0 else acc + term
    return acc


def _by_index(index: Any, exprs: list[Any]) -> Any:
    """exprs[index] for a symbolic index (a chain of selects, folded once unrolled)."""
    from tvm import tirx

    out = exprs[-1]
    for i in range(len(exprs) - 2, -1, -1):
        out = tirx.Select(index == i, exprs[i], out)
    return out


def phases(spec: ConvSpec) -> int:
    """The output's dilation phases (the module docstring): 1 undilated."""
    return spec.dilation[0] * spec.dilation[1]


def tile_grid(spec: ConvSpec, m: int) -> tuple[int, int]:
    """Tiles of m x m per phase of an image, down and across: each phase's lattice is
    the output size over the dilation, rounded up (the last tiles cropped)."""
    lh, lw = (-(-size // d) for size, d in zip(spec.out_size, spec.dilation, strict=True))
    return -(-lh // m), -(-lw // m)


def tiles(spec: ConvSpec, m: int) -> int:
    """Output tiles of the whole batch: the batched GEMMs' rows."""
    nh, nw = tile_grid(spec, m)
    return spec.batch * phases(spec) * nh * nw


def saving(spec: ConvSpec, m: int) -> float:
    """Direct convolution's multiply-adds over the GEMMs' (per input and output
    channel: 9 per output pixel against alpha^2 per tile, the cropped tiles' outputs
    included)."""
    pixels = spec.gemm_shape[0]
    return pixels * math.prod(spec.kernel_size) / (tiles(spec, m) * (m + 2) ** 2)


def packed_shape(spec: ConvSpec, m: int, lanes: int) -> tuple[int, ...]:
    """U as the batched GEMM reads it: [alpha^2, K/lanes, C, lanes]."""
    alpha = m + 2
    return (alpha * alpha, spec.out_channels // lanes, spec.in_channels, lanes)


def weight_transform(spec: ConvSpec, weight: Any, m: int, lanes: int) -> Any:
    """U = G g G^T in `packed_shape`'s layout, with `conv`'s flip applied to g. Two
    stages like the other transforms, rows ("wino_gg": alpha x 3 per output and input
    channel) then columns ("wino_u", its alpha^2 values indexed e = eps * alpha + nu),
    each written out over G's non-zero coefficients."""
    from tvm import te

    alpha = m + 2
    _, _, g_mat = matrices(m)

    def tap(k: Any, c: Any, r: int, s: Any) -> Any:
        if spec.mode == "conv":
            r, s = spec.flipped_taps((r, s))
        return weight[(k, r, s, c) if spec.channels_last else (k, c, r, s)]

    _, blocks, cin, _ = shape = packed_shape(spec, m, lanes)
    # gg[eps, s, kb, c, lane] = sum_r G[eps, r] g[r, s]
    gg = _transform((alpha, 3, blocks, cin, lanes), g_mat.T, 0,
                    lambda i, r: tap(i[2] * lanes + i[4], i[3], r, i[1]), "wino_gg")
    # U[eps * alpha + nu, kb, c, lane] = sum_s gg[eps, s] G[nu, s]
    return te.compute(shape, lambda e, kb, c, lane: _by_index(e, [
        _combine(g_mat[nu], [gg[eps, s, kb, c, lane] for s in range(3)])
        for eps in range(alpha) for nu in range(alpha)]), name="wino_u")


def _transform(shape: tuple[int, ...], mat: np.ndarray, axis: int,
               term: Callable[[tuple[Any, ...], int], Any], name: str) -> Any:
    """One side of a transform: out[idx] = sum_a mat[a, idx[axis]] * term(idx, a),
    written out over the non-zero coefficients of each column of `mat`."""
    from tvm import te

    rows, cols = mat.shape
    return te.compute(shape, lambda *idx: _by_index(idx[axis], [
        _combine(mat[:, j], [term(idx, a) for a in range(rows)]) for j in range(cols)]),
        name=name)


def winograd_tensors(spec: ConvSpec, m: int, lanes: int, packed: bool) -> list[Any]:
    """The TE tensors [data, weight (or packed U), (bias,) (residual,) out] of
    F(m x m, 3 x 3)."""
    from tvm import te, tirx

    from convgen.compiler.compute import RESIDUAL, epilogue

    a_mat, b_mat, _ = matrices(m)
    alpha = m + 2
    n_img, cin, k_out = spec.batch, spec.in_channels, spec.out_channels
    nh, nw = tile_grid(spec, m)
    dh, dw = spec.dilation
    n_tiles = tiles(spec, m)
    pt, pl = spec.pads_begin
    h, w = spec.in_size
    cl = spec.channels_last
    data = te.placeholder(spec.data_shape, "float32", name="data")
    if packed:
        weight = te.placeholder(packed_shape(spec, m, lanes), "float32", name="packed_weight")
        u = weight
    else:
        weight = te.placeholder(spec.weight_shape, "float32", name="weight")
        u = weight_transform(spec, weight, m, lanes)
    bias = te.placeholder(spec.bias_shape, "float32", name="bias") if spec.bias else None
    residual = (te.placeholder(spec.out_shape, "float32", name=RESIDUAL) if spec.residual
                else None)

    def src(n: Any, y: Any, x: Any, c: Any) -> Any:
        inside = tirx.all(y >= pt, y < pt + h, x >= pl, x < pl + w)
        value = data[(n, y - pt, x - pl, c) if cl else (n, c, y - pt, x - pl)]
        return tirx.if_then_else(inside, value, tirx.const(0.0, "float32"))

    # channels-last, and large enough for every phase's whole tiles (the tail tiles
    # read zeros)
    pad = te.compute((n_img, dh * (nh * m + 2), dw * (nw * m + 2), cin), src, name="pad")

    # tile t: image, phase (py, px), then the phase's tile rows and columns
    def tile_in(t: Any, a: Any, b: int, c: Any) -> Any:
        n, phase, th, tw = t // (dh * dw * nh * nw), t // (nh * nw) % (dh * dw), \
            t // nw % nh, t % nw
        return pad[n, phase // dw + dh * (th * m + a), phase % dw + dw * (tw * m + b), c]

    # input: rows, bt[t, a, nu, c] = sum_b d[a, b] B[b, nu]; then columns,
    # v[eps, nu, t, c] = sum_a B[a, eps] bt[t, a, nu, c]
    bt = _transform((n_tiles, alpha, alpha, cin), b_mat, 2,
                    lambda i, b: tile_in(i[0], i[1], b, i[3]), "wino_bt")
    v = _transform((alpha, alpha, n_tiles, cin), b_mat, 0,
                   lambda i, a: bt[i[2], a, i[1], i[3]], "wino_v")
    rc = te.reduce_axis((0, cin), name="rc")
    mm = te.compute(
        (alpha, alpha, n_tiles, k_out),
        lambda eps, nu, t, k: te.sum(
            v[eps, nu, t, rc] * u[eps * alpha + nu, k // lanes, rc, k % lanes], axis=rc),
        name="bgemm",
    )
    # output: columns, at[t, eps, j, k] = sum_nu M[eps, nu, t, k] A[nu, j]; then rows,
    # y[t, i, j, k] = sum_eps A[eps, i] at[t, eps, j, k]
    at = _transform((n_tiles, alpha, m, k_out), a_mat, 2,
                    lambda i, nu: mm[i[1], nu, i[0], i[3]], "wino_at")
    y = _transform((n_tiles, m, m, k_out), a_mat, 1,
                   lambda i, eps: at[i[0], eps, i[2], i[3]], "wino_y")

    def out_body(*idx: Any) -> Any:
        n, k, yy, xx = (idx[0], idx[3], idx[1], idx[2]) if cl else idx
        phase, sy, sx = yy % dh * dw + xx % dw, yy // dh, xx // dw  # its lattice's pixel
        val = y[(n * dh * dw + phase) * nh * nw + sy // m * nw + sx // m, sy % m, sx % m, k]
        return epilogue(spec, val, bias, residual, k, idx)

    out = te.compute(spec.out_shape, out_body, name="out")
    return [t for t in (data, weight, bias, residual, out) if t is not None]


def pack_tensors(spec: ConvSpec, m: int, lanes: int) -> list[Any]:
    """[weight, U]: the packing entry's computation."""
    from tvm import te

    weight = te.placeholder(spec.weight_shape, "float32", name="weight")
    return [weight, weight_transform(spec, weight, m, lanes)]
