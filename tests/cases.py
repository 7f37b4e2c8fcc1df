"""The shared case table: every kernel test is parametrized over it (both modes).

Each row is the flags a user would type (layout order shapes). Chosen to cover
1-D/2-D/3-D, both layouts, stride with 'same', dilation, groups (depthwise and
channel multipliers), even and rectangular kernels, asymmetric pads, batch > 1,
bias and float16, while each compiles in well under a second on 2 cores.
"""

from __future__ import annotations

from typing import Any

import pytest

from convgen.spec import ConvSpec, make_spec

CASE_TABLE: list[dict[str, Any]] = [
    dict(input="1x1x5x5", kernel="1x1x3x3"),  # the seed example's shape
    dict(input="1x8x12x12", kernel="16x8x3x3", padding=1),
    dict(input="2x4x9x7", kernel="6x4x2x4", padding="1,0,2,3"),  # even, rectangular, asym pads
    dict(input="1x6x11x10", kernel="8x6x3x3", padding="same", stride=2),
    dict(input="1x6x11x10", kernel="8x6x3x3", padding="same_lower", stride="2,3"),
    dict(input="1x4x13x13", kernel="4x4x3x3", padding=2, dilation=2),
    dict(input="1x8x10x10", kernel="8x1x3x3", padding=1, groups=8),  # depthwise
    dict(input="1x4x10x10", kernel="8x1x3x3", padding=1, groups=4),  # channel multiplier 2
    dict(input="2x6x8x8", kernel="9x2x3x3", padding="same", groups=3, bias=True),
    dict(input="1x16x7x7", kernel="24x16x1x1"),  # pointwise
    dict(input="1x3x16x16", kernel="8x3x7x7", padding=3, stride=2),  # stem-like
    dict(input="1x10x10x8", kernel="16x3x3x8", padding=1, layout="NHWC"),
    dict(input="2x9x7x6", kernel="6x2x4x2", padding="same", stride=2, groups=3, layout="NHWC",
         bias=True),
    dict(input="1x8x8x8", kernel="8x3x3x1", padding=1, groups=8, layout="NHWC"),
    dict(input="2x3x20", kernel="5x3x4", padding="full"),  # 1-D
    dict(input="1x17x4", kernel="6x5x2", padding=2, stride=3, dilation=2, groups=2,
         layout="NWC"),
    dict(input="1x2x6x7x5", kernel="4x2x3x2x3", padding=1),  # 3-D
    dict(input="1x5x6x7x4", kernel="4x2x3x2x2", padding="same", stride="1,2,1", groups=2,
         layout="NDHWC", bias=True),
    dict(input="1x8x9x9", kernel="8x8x3x3", padding=1, dtype="float16", bias=True),
    dict(input="1x9x9x8", kernel="8x3x3x4", padding="same", groups=2, layout="NHWC",
         dtype="float16"),
    dict(input="1x6x5x16", kernel="6x3x2x8", padding=1, groups=2, layout="NHWC",
         dtype="float16", bias=True),  # channels-last with whole vectors of input channels
    dict(input="1x5x6x32", kernel="8x3x3x16", padding=1, groups=2, layout="NHWC",
         bias=True),  # 16 input channels per group: whole 512-bit vectors too
    dict(input="1x6x7x12", kernel="10x3x3x12", padding=1, stride=2, layout="NHWC",
         bias=True),  # 10 output channels: the last vector runs past K (channel_pad)
    dict(input="1x7x8x20", kernel="20x3x3x1", padding="0,1,2,1", groups=20, layout="NHWC",
         bias=True),  # depthwise on 20 channels: zero input channels past C too
    dict(input="1x6x9x16", kernel="16x3x3x4", padding=1, stride="1,2", groups=4,
         layout="NHWC"),  # 4 output channels per group: vectors of 4 (GROUP_LANES)
    dict(input="1x5x17x8", kernel="32x1x7x8", padding="0,3", layout="NHWC",
         bias=True),  # a prime row, widened from 17 to 18 for tiles of 2, 3 or 6 pixels
    dict(input="1x1x1", kernel="1x1x1", layout="NWC"),  # one output element (hypothesis)
    dict(input="1x24x1x1", kernel="10x24x1x1", bias=True),  # one output pixel: a classifier
]


# The fused epilogues (activation(conv + bias + residual)), each on several rows of the
# table, in turn: every epilogue meets both layouts, 1-D to 3-D, groups and float16.
EPILOGUES: list[dict[str, Any]] = [
    dict(residual=True, activation="relu"),
    dict(activation="relu6"),
    dict(residual=True, activation="silu"),
    dict(activation="hardswish"),
    dict(residual=True),
    dict(activation="relu"),
]


def case_specs(modes: tuple[str, ...] = ("conv", "corr"), epilogues: bool = False
               ) -> list[Any]:
    """pytest params: one per (row, mode), with the spec's name as the test id; with
    `epilogues`, each row with the next of EPILOGUES instead."""
    params = []
    for i, row in enumerate(CASE_TABLE):
        extra = EPILOGUES[i % len(EPILOGUES)] if epilogues else {}
        for mode in modes:
            spec = make_spec(mode=mode, **row, **extra)
            params.append(pytest.param(spec, id=spec.name()))
    return params


def spec_of(row: dict[str, Any], mode: str) -> ConvSpec:
    return make_spec(mode=mode, **row)
