"""A plain numpy oracle for both modes: slow, float64, and obviously right.

    corr(I, K)[n, k, x] = sum_{c, r} I_padded[n, g*Cg + c, x*stride + r*dilation] * K[k, c, r]
    conv(I, K)          = corr(I, flip(K))   (flip on every spatial axis)
    out = activation(conv or corr + bias + residual)   (the fused epilogue)
"""

from __future__ import annotations

import itertools

import numpy as np

from convgen.spec import ConvSpec


def to_channels_first(a: np.ndarray) -> np.ndarray:
    """N x spatial x C -> N x C x spatial."""
    return np.moveaxis(a, -1, 1)


def to_channels_last(a: np.ndarray) -> np.ndarray:
    """N x C x spatial -> N x spatial x C."""
    return np.moveaxis(a, 1, -1)


def weight_to_channels_first(w: np.ndarray) -> np.ndarray:
    """K x R... x C/g -> K x C/g x R... (the same move as the activations)."""
    return np.moveaxis(w, -1, 1)


def reference_conv(
    spec: ConvSpec, data: np.ndarray, weight: np.ndarray, *rest: np.ndarray
) -> np.ndarray:
    """The operator on numpy arrays in the spec's layout; returns spec.out_shape, spec.dtype.
    The inputs come in `spec.input_shapes()` order (data, weight[, bias][, residual]),
    as `*inputs.values()` gives them."""
    extra = dict(zip(list(spec.input_shapes())[2:], rest, strict=True))
    bias, residual = extra.get("bias"), extra.get("residual")
    x = np.asarray(data, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    if spec.channels_last:
        x, w = to_channels_first(x), weight_to_channels_first(w)
    if spec.mode == "conv":
        w = np.flip(w, axis=tuple(range(2, 2 + spec.ndim)))
    x = np.pad(x, [(0, 0), (0, 0), *zip(spec.pads_begin, spec.pads_end)])

    cg, kg = spec.channels_per_group, spec.out_channels_per_group
    out = np.zeros((spec.batch, spec.out_channels, *spec.out_size))
    for tap in itertools.product(*(range(r) for r in spec.kernel_size)):
        window = tuple(
            slice(r * d, r * d + (o - 1) * s + 1, s)
            for r, d, o, s in zip(tap, spec.dilation, spec.out_size, spec.stride)
        )
        for g in range(spec.groups):
            xs = x[(slice(None), slice(g * cg, (g + 1) * cg), *window)]  # N, Cg, out...
            ws = w[(slice(g * kg, (g + 1) * kg), slice(None), *tap)]  # Kg, Cg
            out[:, g * kg : (g + 1) * kg] += np.einsum("nc...,kc->nk...", xs, ws)
    if bias is not None:
        out += np.asarray(bias, dtype=np.float64).reshape(-1, *([1] * spec.ndim))
    if spec.channels_last:
        out = to_channels_last(out)
    if residual is not None:
        out += np.asarray(residual, dtype=np.float64)
    return activate(spec.activation, out).astype(spec.dtype)


def activate(activation: str, x: np.ndarray) -> np.ndarray:
    """The spec's activation (`spec.ACTIVATIONS`) in float64."""
    if activation == "relu":
        return np.maximum(x, 0.0)
    if activation == "relu6":
        return np.clip(x, 0.0, 6.0)
    if activation == "silu":
        return x / (1.0 + np.exp(-x))
    if activation == "hardswish":
        return x * np.clip(x + 3.0, 0.0, 6.0) / 6.0
    return x


def flip_weight(spec: ConvSpec, weight: np.ndarray) -> np.ndarray:
    """The weight flipped on every spatial axis, in the spec's weight layout."""
    return np.ascontiguousarray(np.flip(weight, axis=spec.weight_window_axes))
