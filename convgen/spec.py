"""The operator spec: one frozen `ConvSpec`, and every formula derived from it.

Everything the later stages need to know about the operator (shapes in the
chosen layout, output size, padding, FLOPs, names) is computed here and only
here. Parsing from CLI strings, spec files (TOML/JSON) and ONNX Conv nodes ends
in `make_spec`, which validates and normalises.

Conventions:
  * `mode="conv"` is true convolution (kernel flipped on every spatial axis, as
    scipy.signal.convolve and cuDNN's CUDNN_CONVOLUTION); `mode="corr"` is
    cross-correlation (what ONNX Conv, PyTorch and TVM's TOPI compute).
  * Pads are explicit per side in input coordinates, ONNX order: all begins,
    then all ends. They mean the same in both modes, so
    conv(I, K, pads) == ONNX Conv(I, flip(K), pads).
  * Channels-first layouts (NCW, NCHW, NCDHW) take the weight as K x C/g x R...;
    channels-last layouts (NWC, NHWC, NDHWC) take it as K x R... x C/g (OHWI,
    the layout of PyTorch's channels_last weights and cuDNN's NHWC filters).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from convgen.errors import SpecError

MODES = ("conv", "corr")
DTYPES = ("float32", "float16")
CHANNELS_FIRST = {1: "NCW", 2: "NCHW", 3: "NCDHW"}
CHANNELS_LAST = {1: "NWC", 2: "NHWC", 3: "NDHWC"}
PADDING_WORDS = ("valid", "same", "same_lower", "full")
# The activation a kernel applies in its write-back, after bias and residual, and the
# ONNX node(s) that compute the same: relu Relu, relu6 Clip(0, 6) (MobileNetV2),
# silu x * Sigmoid(x) (EfficientNet), hardswish HardSwish (MobileNetV3).
ACTIVATIONS = ("none", "relu", "relu6", "silu", "hardswish")


@dataclass(frozen=True)
class ConvSpec:
    """One convolution operator, fully resolved (explicit pads, one value per axis)."""

    mode: str
    batch: int
    in_channels: int
    in_size: tuple[int, ...]
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[int, ...]  # begins of every spatial axis, then ends
    groups: int = 1
    channels_last: bool = False
    dtype: str = "float32"
    bias: bool = False
    # the fused epilogue, in ONNX's order: out = activation(conv + bias + residual),
    # where residual is an input of the output's shape (a ResNet block's shortcut)
    residual: bool = False
    activation: str = "none"

    def __post_init__(self) -> None:
        _validate(self)

    # ---- derived sizes (the only place these formulas live) -------------------

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (1, 2 or 3)."""
        return len(self.in_size)

    @property
    def layout(self) -> str:
        return (CHANNELS_LAST if self.channels_last else CHANNELS_FIRST)[self.ndim]

    @property
    def channels_per_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def out_channels_per_group(self) -> int:
        return self.out_channels // self.groups

    @property
    def depthwise_like(self) -> bool:
        """One input and one output channel per group: each output channel reads only
        its own input channel (a depthwise layer, or a single-channel one)."""
        return self.channels_per_group == 1 and self.out_channels_per_group == 1

    @property
    def pads_begin(self) -> tuple[int, ...]:
        return self.pads[: self.ndim]

    @property
    def pads_end(self) -> tuple[int, ...]:
        return self.pads[self.ndim :]

    @property
    def padded_size(self) -> tuple[int, ...]:
        return tuple(n + b + e for n, b, e in zip(self.in_size, self.pads_begin, self.pads_end))

    def widened(self, extra: int) -> ConvSpec:
        """This operator with `extra` more outputs along the last spatial axis: the end
        padding grows by extra * stride, which leaves the first outputs unchanged and
        keeps every read of the new ones in bounds (a schedule computes them to fill a
        vector, then crops them)."""
        if not extra:
            return self
        pads = (*self.pads[:-1], self.pads[-1] + extra * self.stride[-1])
        return replace(self, pads=pads)

    @property
    def pointwise(self) -> bool:
        """A unit kernel at unit stride without padding: each output pixel reads the
        input pixel at its own position, so input and output share their pixel order."""
        return (all(r == 1 for r in self.kernel_size) and all(s == 1 for s in self.stride)
                and not any(self.pads))

    def rows_merged(self, rows: int) -> ConvSpec:
        """This pointwise operator on its tensors viewed with every `rows` rows as one:
        the last two spatial axes (H, W) as (H / rows, rows * W). Either layout keeps
        H and W adjacent, W innermost of the two, so the view is the same memory and
        computes the same outputs; a kernel's row tiles then run across row ends."""
        if rows == 1:
            return self
        if not self.pointwise or self.ndim < 2 or self.in_size[-2] % rows:
            raise ValueError(f"{self.name()}: rows cannot merge by {rows}")
        *outer, h, w = self.in_size
        return replace(self, in_size=(*outer, h // rows, w * rows))

    @property
    def dilated_kernel_size(self) -> tuple[int, ...]:
        return tuple(dilated_extent(r, d) for r, d in zip(self.kernel_size, self.dilation))

    @property
    def out_size(self) -> tuple[int, ...]:
        return tuple(
            (p - k) // s + 1
            for p, k, s in zip(self.padded_size, self.dilated_kernel_size, self.stride)
        )

    def _tap_input(self, axis: int, y: int, r: int) -> int:
        """The input pixel (on a spatial axis; outside [0, in_size) in the padding) that
        tap r (a window position, before `conv`'s flip) of output y reads."""
        return y * self.stride[axis] - self.pads_begin[axis] + r * self.dilation[axis]

    def _live_taps(self, axis: int, y: int) -> list[int]:
        """The taps of output `y` on a spatial axis that read an input pixel rather
        than padding."""
        return [r for r in range(self.kernel_size[axis])
                if 0 <= self._tap_input(axis, y, r) < self.in_size[axis]]

    def _undilated_where_single(self, kernel: tuple[int, ...]) -> tuple[int, ...]:
        """The dilation of a window cut to `kernel` taps: 1 on an axis left one tap
        wide (the same reads, and the spec of a plain 1-tap axis)."""
        return tuple(d if k > 1 else 1 for k, d in zip(kernel, self.dilation, strict=True))

    def _dead_taps(self) -> tuple[tuple[int, int], ...]:
        """Per spatial axis, how many taps at the start and at the end of the window
        read only zero padding, whatever the output (`_live_taps`), and that the
        padding on that side is wide enough to drop (one tap: `dilation` padding
        pixels), so the pads left stay >= 0."""
        cuts = []
        for axis, (k, d, b, e) in enumerate(zip(self.kernel_size, self.dilation,
                                                self.pads_begin, self.pads_end, strict=True)):
            live = sorted({r for y in range(self.out_size[axis]) for r in self._live_taps(axis, y)})
            if not live:  # (every output is the epilogue of zero: nothing to shorten)
                cuts.append((0, 0))
                continue
            cuts.append((min(live[0], b // d), min(k - 1 - live[-1], e // d)))
        return tuple(cuts)

    def without_dead_taps(self) -> ConvSpec:
        """The same operator without the taps at either end of the window that read
        only zero padding: the window shorter by them, the padding by them times the
        dilation, the output and every other tap's reads unchanged (an axis left with
        one tap undilated: the same reads). DeepLab's ASPP layer dilated by 36 on a
        28x28 input is a plain 1x1 layer so, 9x fewer multiply-adds. Its weights are
        `kept_weight_index`'s slice of this spec's."""
        cuts = self._dead_taps()
        if not any(a or c for a, c in cuts):
            return self
        kernel = tuple(k - a - c for k, (a, c) in zip(self.kernel_size, cuts, strict=True))
        dilation = self._undilated_where_single(kernel)
        begins = tuple(b - a * d for b, (a, _), d in zip(self.pads_begin, cuts, self.dilation,
                                                          strict=True))
        ends = tuple(e - c * d for e, (_, c), d in zip(self.pads_end, cuts, self.dilation,
                                                        strict=True))
        return replace(self, kernel_size=kernel, dilation=dilation, pads=(*begins, *ends))

    def kept_weight_index(self) -> tuple[slice, ...]:
        """The index into this spec's weight tensor (its layout) of the weights
        `without_dead_taps` keeps: the live taps, which `conv` reads flipped."""
        return self._window_index([(a, k - c) for k, (a, c) in
                                   zip(self.kernel_size, self._dead_taps(), strict=True)])

    def _window_index(self, taps: Sequence[tuple[int, int]]) -> tuple[slice, ...]:
        """The index into the weight tensor of the taps [start, stop) on each spatial
        axis (counted before `conv`'s flip, which reads them from the other end)."""
        window = [slice(k - stop, k - start) if self.mode == "conv" else slice(start, stop)
                  for k, (start, stop) in zip(self.kernel_size, taps, strict=True)]
        if self.channels_last:
            return (slice(None), *window, slice(None))
        return (slice(None), slice(None), *window)

    def tap_regions(self) -> list[TapRegion]:
        """The outputs split into boxes by the taps that read an input pixel there
        (on each axis, the runs of outputs with the same such taps, which are
        contiguous: tap r reads inside for a run of outputs, shifted by the dilation
        from tap r - 1's), row-major. In each box those taps alone are computed, on
        the input box they read, without padding. Empty where some output reads only
        padding (it is the epilogue of zero)."""
        axes = []
        for axis, out in enumerate(self.out_size):
            runs: list[tuple[int, int, int, int]] = []  # output start, stop; taps start, stop
            for y in range(out):
                live = self._live_taps(axis, y)
                if not live or len(live) != live[-1] - live[0] + 1:
                    return []
                taps = (live[0], live[-1] + 1)
                if runs and runs[-1][2:] == taps:
                    runs[-1] = (runs[-1][0], y + 1, *taps)
                else:
                    runs.append((y, y + 1, *taps))
            axes.append(runs)
        regions = []
        for box in itertools.product(*axes):
            # from the first output's first live tap to the last output's last one
            inputs = tuple((self._tap_input(axis, y0, r0),
                            self._tap_input(axis, y1 - 1, r1 - 1) + 1)
                           for axis, (y0, y1, r0, r1) in enumerate(box))
            kernel = tuple(r1 - r0 for _, _, r0, r1 in box)
            spec = replace(self, in_size=tuple(stop - start for start, stop in inputs),
                           kernel_size=kernel, pads=(0,) * (2 * self.ndim),
                           dilation=self._undilated_where_single(kernel))
            regions.append(TapRegion(tuple((y0, y1) for y0, y1, _, _ in box), inputs, spec,
                                     self._window_index([(r0, r1) for _, _, r0, r1 in box])))
        return regions

    @property
    def data_shape(self) -> tuple[int, ...]:
        return self._activation_shape(self.in_channels, self.in_size)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self._activation_shape(self.out_channels, self.out_size)

    @property
    def weight_window_axes(self) -> tuple[int, ...]:
        """The weight tensor's kernel-window axes (R1, R2, ...), in its layout."""
        first = 1 if self.channels_last else 2
        return tuple(range(first, first + self.ndim))

    def flipped_taps(self, taps: tuple[Any, ...]) -> tuple[Any, ...]:
        """conv's flip of kernel-window indices, r -> R-1-r on every spatial axis
        (integers or symbolic indices)."""
        return tuple(r_ext - 1 - r for r, r_ext in zip(taps, self.kernel_size))

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.channels_last:
            return (self.out_channels, *self.kernel_size, self.channels_per_group)
        return (self.out_channels, self.channels_per_group, *self.kernel_size)

    @property
    def bias_shape(self) -> tuple[int, ...]:
        return (self.out_channels,)

    @property
    def element_bytes(self) -> int:
        return {"float32": 4, "float16": 2}[self.dtype]

    @property
    def weight_bytes(self) -> int:
        """The weight tensor's size in memory (what a cache must hold to reuse it)."""
        return math.prod(self.weight_shape) * self.element_bytes

    @property
    def out_bytes(self) -> int:
        """The output tensor's size in memory (what the next layer reads back)."""
        return math.prod(self.out_shape) * self.element_bytes

    @property
    def accum_dtype(self) -> str:
        """float16 multiplies in float32 and accumulates there."""
        return "float32"

    @property
    def gemm_shape(self) -> tuple[int, int, int]:
        """The operator as an implicit GEMM: M = output pixels (batch included),
        N = output channels, K = the reduction per output (C/groups x taps)."""
        return (
            self.batch * math.prod(self.out_size),
            self.out_channels,
            self.channels_per_group * math.prod(self.kernel_size),
        )

    @property
    def flops(self) -> int:
        """Multiply-adds counted as 2 FLOPs (bias not counted)."""
        m, n, k = self.gemm_shape
        return 2 * m * n * k

    @property
    def is_depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels

    def _activation_shape(self, channels: int, size: tuple[int, ...]) -> tuple[int, ...]:
        if self.channels_last:
            return (self.batch, *size, channels)
        return (self.batch, channels, *size)

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """The entry function's inputs, in call order."""
        shapes = {"data": self.data_shape, "weight": self.weight_shape}
        if self.bias:
            shapes["bias"] = self.bias_shape
        if self.residual:
            shapes["residual"] = self.out_shape
        return shapes

    @property
    def constant_inputs(self) -> tuple[str, ...]:
        """The inputs a deployed model holds constant, which `Kernel.bind` packs once:
        weight[, bias]. The others, data[, residual], come with every call."""
        return ("weight", "bias") if self.bias else ("weight",)

    @property
    def has_epilogue(self) -> bool:
        """Whether the output is more than the convolution: a bias, a residual input or
        an activation, fused into the write-back."""
        return self.bias or self.residual or self.activation != "none"

    def without_epilogue(self) -> ConvSpec:
        """The same convolution without bias, residual or activation (the part a
        schedule and a tuning record are about)."""
        return replace(self, bias=False, residual=False, activation="none")

    # ---- identity ---------------------------------------------------------------

    def name(self) -> str:
        """A unique, file-name-safe, human-readable id (also used for test ids)."""

        def xs(values: Iterable[int]) -> str:
            return "x".join(str(v) for v in values)

        parts = [
            f"{self.mode}{self.ndim}d",
            self.layout.lower(),
            self.dtype,
            f"n{self.batch}c{self.in_channels}i{xs(self.in_size)}",
            f"k{self.out_channels}r{xs(self.kernel_size)}",
            f"s{xs(self.stride)}",
            f"d{xs(self.dilation)}",
            f"p{xs(self.pads)}",
            f"g{self.groups}",
        ]
        if self.bias:
            parts.append("bias")
        if self.residual:
            parts.append("res")
        if self.activation != "none":
            parts.append(self.activation)
        return "_".join(parts)

    def key(self) -> str:
        """The exact identity for tuning records: every field, canonical JSON."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        d["layout"] = self.layout
        del d["channels_last"]
        # the epilogue fields only where set, so specs without one keep the keys (and
        # the tuning records) they had before fusion existed
        if not self.residual:
            del d["residual"]
        if self.activation == "none":
            del d["activation"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConvSpec:
        """Inverse of `to_dict` (used for manifests and tuning records)."""
        fields = dict(d)
        layout = str(fields.pop("layout", "NCHW"))
        try:
            return cls(
                mode=fields["mode"],
                batch=int(fields["batch"]),
                in_channels=int(fields["in_channels"]),
                in_size=tuple(fields["in_size"]),
                out_channels=int(fields["out_channels"]),
                kernel_size=tuple(fields["kernel_size"]),
                stride=tuple(fields["stride"]),
                dilation=tuple(fields["dilation"]),
                pads=tuple(fields["pads"]),
                groups=int(fields.get("groups", 1)),
                channels_last=_parse_layout(layout, len(fields["in_size"])),
                dtype=fields.get("dtype", "float32"),
                bias=bool(fields.get("bias", False)),
                residual=bool(fields.get("residual", False)),
                activation=str(fields.get("activation", "none")),
            )
        except KeyError as err:
            raise SpecError(f"spec: missing field {err.args[0]!r}") from None

    def describe(self) -> str:
        """One line for humans."""
        flip = "true convolution" if self.mode == "conv" else "cross-correlation"
        shape = "x".join(map(str, self.data_shape))
        wshape = "x".join(map(str, self.weight_shape))
        return (
            f"{self.mode} ({flip}) {self.layout} {self.dtype} input {shape} kernel {wshape} "
            f"stride {list(self.stride)} dilation {list(self.dilation)} pads {list(self.pads)} "
            f"groups {self.groups}{' +bias' if self.bias else ''}"
            f"{' +residual' if self.residual else ''}"
            f"{' ' + self.activation if self.activation != 'none' else ''}"
        )


@dataclass(frozen=True)
class TapRegion:
    """A box of a spec's outputs in which the same taps read the input and the others
    only padding (`ConvSpec.tap_regions`): `spec` computes it, unpadded, from the
    input box `inputs`, with the weights at `weights` in the whole spec's weight
    tensor."""

    outputs: tuple[tuple[int, int], ...]  # per spatial axis: start, stop
    inputs: tuple[tuple[int, int], ...]
    spec: ConvSpec
    weights: tuple[slice, ...]


def dilated_extent(kernel: int, dilation: int) -> int:
    """The input span one output reads along an axis: d * (r - 1) + 1."""
    return dilation * (kernel - 1) + 1


# ---- validation -------------------------------------------------------------------


def _validate(s: ConvSpec) -> None:
    if s.mode not in MODES:
        raise SpecError(f"mode: {s.mode!r} is not one of {', '.join(MODES)}")
    if s.dtype not in DTYPES:
        raise SpecError(f"dtype: {s.dtype!r} is not one of {', '.join(DTYPES)}")
    if s.activation not in ACTIVATIONS:
        raise SpecError(
            f"activation: {s.activation!r} is not one of {', '.join(ACTIVATIONS)}"
        )
    nd = len(s.in_size)
    if nd not in (1, 2, 3):
        raise SpecError(f"input: {nd} spatial dimensions given; convgen supports 1, 2 or 3")
    _positive("input", "batch", s.batch)
    _positive("input", "channels", s.in_channels)
    _positive("kernel", "output channels", s.out_channels)
    _positive("groups", "groups", s.groups)
    for field, values, n in (
        ("input", s.in_size, nd),
        ("kernel", s.kernel_size, nd),
        ("stride", s.stride, nd),
        ("dilation", s.dilation, nd),
        ("padding", s.pads, 2 * nd),
    ):
        if len(values) != n:
            raise SpecError(
                f"{field}: {list(values)} has {len(values)} values, expected {n} "
                f"for {nd} spatial dimension(s)"
            )
    _check_sizes(s.in_size, s.kernel_size)
    _check_steps(s.stride, s.dilation)
    for v in s.pads:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise SpecError(f"padding: {list(s.pads)} must be non-negative integers")
    if s.in_channels % s.groups:
        raise SpecError(
            f"groups: {s.groups} does not divide the input channels ({s.in_channels})"
        )
    if s.out_channels % s.groups:
        raise SpecError(
            f"groups: {s.groups} does not divide the output channels ({s.out_channels})"
        )
    for axis, (p, k) in enumerate(zip(s.padded_size, s.dilated_kernel_size)):
        if k > p:
            raise SpecError(
                f"kernel: dilated extent {k} on spatial axis {axis} is larger than the "
                f"padded input ({p}); the output would be empty"
            )


def _check_sizes(in_size: Sequence[int], kernel_size: Sequence[int]) -> None:
    for v in in_size:
        _positive("input", "every spatial size", v)
    for v in kernel_size:
        _positive("kernel", "every spatial size", v)


def _check_steps(stride: Sequence[int], dilation: Sequence[int]) -> None:
    for v in stride:
        _positive("stride", "every stride", v)
    for v in dilation:
        _positive("dilation", "every dilation", v)


def _positive(field: str, what: str, v: object) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise SpecError(f"{field}: {what} must be a positive integer, got {v!r}")


# ---- construction from loose user input ------------------------------------------------

Scalar = int | str
ShapeLike = str | Sequence[int]
ListLike = int | str | Sequence[int]


def make_spec(
    *,
    mode: str,
    input: ShapeLike,
    kernel: ShapeLike,
    padding: ListLike | None = 0,
    stride: ListLike | None = 1,
    dilation: ListLike | None = 1,
    groups: int | str = 1,
    layout: str | None = None,
    dtype: str = "float32",
    bias: bool = False,
    residual: bool = False,
    activation: str | None = "none",
) -> ConvSpec:
    """Build a `ConvSpec` from the CLI / spec-file forms.

    `input` is the data shape in the layout's order (N x C x spatial for
    channels-first, N x spatial x C for channels-last); `kernel` is the weight
    shape in the layout's order (K x C/groups x R... or K x R... x C/groups).
    `padding` is an int, one per axis, explicit per side (begins then ends), or
    one of valid / same (ONNX SAME_UPPER) / same_lower / full. `residual` and
    `activation` are the fused epilogue: activation(conv + bias + residual).
    """
    mode = str(mode).strip().lower()
    if mode not in MODES:
        raise SpecError(
            f"mode: {mode!r} is not one of conv (true convolution, kernel flipped) "
            f"or corr (cross-correlation, as ONNX Conv / PyTorch)"
        )
    in_shape = parse_shape(input, "input")
    w_shape = parse_shape(kernel, "kernel")
    if len(in_shape) < 3 or len(in_shape) > 5:
        raise SpecError(
            f"input: {_fmt(in_shape)} must have 3 to 5 dimensions "
            "(batch, channels and 1-3 spatial)"
        )
    nd = len(in_shape) - 2
    if len(w_shape) != len(in_shape):
        raise SpecError(
            f"kernel: {_fmt(w_shape)} has rank {len(w_shape)} but the input "
            f"{_fmt(in_shape)} has rank {len(in_shape)}"
        )
    channels_last = _parse_layout(layout, nd)
    batch, chans, size, k_out, k_in, ksize = _split_shapes(in_shape, w_shape, channels_last)
    groups_i = _parse_int(groups, "groups")
    # (value ranges are ConvSpec's to check; this one needs both shapes as the user gave them)
    if groups_i > 0 and chans > 0 and chans % groups_i == 0 and k_in != chans // groups_i:
        raise SpecError(
            f"kernel: {_fmt(w_shape)} has {k_in} input channels per group, but the input "
            f"has {chans} channels in {groups_i} group(s), so it must be {chans // groups_i}"
        )
    stride_t = _per_axis(stride if stride is not None else 1, nd, "stride")
    dilation_t = _per_axis(dilation if dilation is not None else 1, nd, "dilation")
    # the padding words' formulas divide by the stride and span the dilated kernel:
    # the checks ConvSpec makes of these fields, made before they are used
    _check_sizes(size, ksize)
    _check_steps(stride_t, dilation_t)
    pads = resolve_padding(padding if padding is not None else 0, size, ksize, stride_t,
                           dilation_t)
    dtype = str(dtype).strip().lower()
    aliases = {"fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16"}
    dtype = aliases.get(dtype, dtype)
    return ConvSpec(
        mode=mode,
        batch=batch,
        in_channels=chans,
        in_size=size,
        out_channels=k_out,
        kernel_size=ksize,
        stride=stride_t,
        dilation=dilation_t,
        pads=pads,
        groups=groups_i,
        channels_last=channels_last,
        dtype=dtype,
        bias=bool(bias),
        residual=bool(residual),
        activation=str(activation or "none").strip().lower(),
    )


def _split_shapes(
    in_shape: tuple[int, ...], w_shape: tuple[int, ...], channels_last: bool
) -> tuple[int, int, tuple[int, ...], int, int, tuple[int, ...]]:
    """The shapes in the layout's order -> (batch, channels, spatial size, output
    channels, input channels per group, kernel size)."""
    if channels_last:
        batch, *size, chans = in_shape
        k_out, *ksize, k_in = w_shape
    else:
        batch, chans, *size = in_shape
        k_out, k_in, *ksize = w_shape
    return batch, chans, tuple(size), k_out, k_in, tuple(ksize)


def resolve_padding(
    padding: ListLike,
    in_size: tuple[int, ...],
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
) -> tuple[int, ...]:
    """Any accepted padding form -> explicit pads (all begins, then all ends)."""
    nd = len(in_size)
    if isinstance(padding, str) and padding.strip().lower() in PADDING_WORDS:
        word = padding.strip().lower()
        extents = [dilated_extent(k, d) for k, d in zip(kernel_size, dilation)]
        if word == "valid":
            return (0,) * (2 * nd)
        if word == "full":
            full = tuple(e - 1 for e in extents)
            return full + full
        # SAME: output = ceil(input / stride); the odd pixel goes to the end
        # (SAME_UPPER, ONNX's and TensorFlow's convention) or the beginning.
        begins, ends = [], []
        for n, e, s in zip(in_size, extents, stride):
            out = -(-n // s)
            total = max(0, (out - 1) * s + e - n)
            small, large = total // 2, total - total // 2
            begins.append(small if word == "same" else large)
            ends.append(large if word == "same" else small)
        return (*begins, *ends)
    values = _parse_int_list(padding, "padding")
    if any(v < 0 for v in values):
        raise SpecError(f"padding: {_fmt_list(values)} must be non-negative")
    if len(values) == 1:
        return values * (2 * nd)
    if len(values) == nd:
        return values + values
    if len(values) == 2 * nd:
        return values
    raise SpecError(
        f"padding: {_fmt_list(values)} has {len(values)} values; give 1, {nd} (one per axis), "
        f"{2 * nd} (all begins, then all ends) or one of {', '.join(PADDING_WORDS)}"
    )


def parse_shape(value: ShapeLike, field: str) -> tuple[int, ...]:
    """'1x64x56x56' (or a list of ints) -> (1, 64, 56, 56)."""
    if isinstance(value, str):
        text = value.strip().lower().replace("*", "x")
        parts = [p.strip() for p in text.split("x")]
        if not text or any(not re.fullmatch(r"-?\d+", p) for p in parts):
            raise SpecError(f"{field}: {value!r} is not a shape like 1x64x56x56")
        return tuple(int(p) for p in parts)
    try:
        return tuple(_parse_int(v, field) for v in value)
    except TypeError:
        raise SpecError(f"{field}: {value!r} is not a shape like 1x64x56x56") from None


def _per_axis(value: ListLike, nd: int, field: str) -> tuple[int, ...]:
    values = _parse_int_list(value, field)
    if len(values) == 1:
        return values * nd
    if len(values) != nd:
        raise SpecError(
            f"{field}: {_fmt_list(values)} has {len(values)} values; give 1 or {nd} "
            "(one per spatial axis)"
        )
    return values


def _parse_int_list(value: ListLike, field: str) -> tuple[int, ...]:
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        if not value.strip() or any(not re.fullmatch(r"-?\d+", p) for p in parts):
            raise SpecError(f"{field}: {value!r} is not an integer or a comma-separated list")
        return tuple(int(p) for p in parts)
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    try:
        return tuple(_parse_int(v, field) for v in value)
    except TypeError:
        raise SpecError(f"{field}: {value!r} is not an integer or a list of integers") from None


def _parse_int(value: Scalar, field: str) -> int:
    if isinstance(value, bool):
        raise SpecError(f"{field}: {value!r} is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise SpecError(f"{field}: {value!r} is not an integer")


def _parse_layout(layout: str | None, nd: int) -> bool:
    """-> True for channels-last. Accepts NCHW/NHWC-style names of any rank, or
    channels_first / channels_last."""
    if layout is None:
        return False
    text = str(layout).strip().upper().replace("-", "_")
    if text in ("CHANNELS_FIRST", "NC"):
        return False
    if text in ("CHANNELS_LAST", "NLC"):
        return True
    if text in CHANNELS_FIRST.values() or text in CHANNELS_LAST.values():
        spatial = len(text) - 2
        if spatial != nd:
            raise SpecError(
                f"layout: {layout!r} is for {spatial} spatial dimension(s), but the input "
                f"has {nd}; use {CHANNELS_FIRST[nd]} or {CHANNELS_LAST[nd]}"
            )
        return text in CHANNELS_LAST.values()
    raise SpecError(
        f"layout: {layout!r} is not one of {CHANNELS_FIRST.get(nd, 'NCHW')}, "
        f"{CHANNELS_LAST.get(nd, 'NHWC')}, channels_first, channels_last"
    )


def _fmt(shape: Sequence[int]) -> str:
    return "x".join(str(v) for v in shape)


def _fmt_list(values: Sequence[int]) -> str:
    return ",".join(str(v) for v in values)


# ---- spec files and ONNX models ------------------------------------------------------------

SPEC_FIELDS = (
    "mode", "input", "kernel", "padding", "stride", "dilation", "groups", "layout", "dtype",
    "bias", "residual", "activation",
)  # fmt: skip


def specs_from_file(path: str) -> list[tuple[str | None, ConvSpec]]:
    """Read a TOML or JSON spec file: one table per kernel, with the CLI's field names.

    TOML: either named tables (`[conv1]`, `[conv2]`, ...) or an array of tables
    (`[[kernel]]`). JSON: an object of named objects, or a list of objects.
    Returns (table name or None, spec) pairs.
    """
    import tomllib

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise SpecError(f"spec: cannot read {path}: {err.strerror}") from None
    try:
        if path.endswith(".json"):
            doc: Any = json.loads(raw)
        else:
            doc = tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as err:
        raise SpecError(f"spec: {path} is not valid {_kind(path)}: {err}") from None

    tables: list[tuple[str | None, Any]]
    if isinstance(doc, list):
        tables = [(None, t) for t in doc]
    elif isinstance(doc, dict) and set(doc) == {"kernel"} and isinstance(doc["kernel"], list):
        tables = [(None, t) for t in doc["kernel"]]
    elif isinstance(doc, dict):
        tables = list(doc.items())
    else:
        raise SpecError(f"spec: {path} must hold one table per kernel")
    if not tables:
        raise SpecError(f"spec: {path} holds no kernels")
    out = []
    for i, (name, table) in enumerate(tables):
        where = f"{path}: {'[' + name + ']' if name else f'kernel #{i + 1}'}"
        if not isinstance(table, dict):
            raise SpecError(f"spec: {where} is not a table of fields")
        unknown = sorted(set(table) - set(SPEC_FIELDS))
        if unknown:
            raise SpecError(
                f"{unknown[0]}: unknown field in {where}; fields are {', '.join(SPEC_FIELDS)}"
            )
        for required in ("mode", "input", "kernel"):
            if required not in table:
                raise SpecError(f"{required}: missing in {where}")
        try:
            out.append((name, make_spec(**table)))
        except SpecError as err:
            raise SpecError(f"{err} (in {where})") from None
    return out


def _kind(path: str) -> str:
    return "JSON" if path.endswith(".json") else "TOML"


SHAPE_HINT = "fix it with --shape NAME=DIMS, e.g. --shape input=1x3x224x224"


def parse_input_shapes(values: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """`--shape` values, 'x=1x3x224x224', -> {'x': (1, 3, 224, 224)}."""
    shapes: dict[str, tuple[int, ...]] = {}
    for value in values:
        name, sep, dims = (part.strip() for part in value.partition("="))
        if not sep or not name:
            raise SpecError(f"shape: {value!r} is not NAME=DIMS, e.g. input=1x3x224x224")
        if name in shapes:
            raise SpecError(f"shape: input {name!r} given twice")
        shape = parse_shape(dims, f"shape: {name}")
        if any(d <= 0 for d in shape):
            raise SpecError(f"shape: {name}: {dims!r} has a dimension below 1")
        shapes[name] = shape
    return shapes


def pin_input_shapes(model: Any, shapes: Mapping[str, tuple[int, ...]]) -> Any:
    """The ONNX model with its inputs' dimensions fixed to `shapes` (by input name; a
    copy, the model itself where there are none). A model exported with dynamic axes
    (a batch dimension `N`) compiles at the shapes it will be called with; a dimension
    the model fixes must be given as the model has it."""
    if not shapes:
        return model
    import onnx

    pinned = onnx.ModelProto()
    pinned.CopyFrom(model)
    weights = {t.name for t in pinned.graph.initializer}
    inputs = {vi.name: vi for vi in pinned.graph.input if vi.name not in weights}
    for name, dims in shapes.items():
        if name not in inputs:
            raise SpecError(f"shape: the model has no input {name!r} "
                            f"(its inputs: {', '.join(inputs) or 'none'})")
        shape = inputs[name].type.tensor_type.shape
        declared = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                    for d in shape.dim]
        if inputs[name].type.tensor_type.HasField("shape") and len(declared) != len(dims):
            raise SpecError(f"shape: input {name!r} has {len(declared)} dimensions "
                            f"({_fmt_dims(declared)}), not {len(dims)}")
        for axis, (was, given) in enumerate(zip(declared, dims)):
            if isinstance(was, int) and was != given:
                raise SpecError(f"shape: input {name!r} has dimension {axis} fixed at {was} "
                                f"by the model ({_fmt_dims(declared)}), not {given}")
        shape.ClearField("dim")
        for given in dims:
            shape.dim.add().dim_value = given
    return pinned


def _fmt_dims(dims: Sequence[int | str]) -> str:
    return "x".join(str(d) for d in dims)


def specs_from_onnx(path: str, mode: str = "corr",
                    shapes: Mapping[str, tuple[int, ...]] | None = None
                    ) -> list[tuple[str, ConvSpec]]:
    """Every Conv node of an ONNX model with static shapes -> (node name, spec);
    `shapes` fixes dynamic input dimensions (`pin_input_shapes`).

    ONNX Conv is cross-correlation; pass mode="conv" to get true convolutions
    with the same shapes instead.
    """
    import onnx
    from onnx import shape_inference

    try:
        model = onnx.load(path)
    except Exception as err:  # onnx raises several unrelated types here
        raise SpecError(f"spec: cannot read ONNX model {path}: {err}") from None
    model = pin_input_shapes(model, shapes or {})
    try:
        model = shape_inference.infer_shapes(model)
    except Exception as err:
        raise SpecError(f"spec: cannot read ONNX model {path}: {err}") from None
    graph = model.graph
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for vi in (*graph.input, *graph.value_info, *graph.output):
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        shapes[vi.name] = tuple(dims)
        dtypes[vi.name] = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
        dtypes[init.name] = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).name
    found = []
    for i, node in enumerate(graph.node):
        if node.op_type != "Conv":
            continue
        name = node.name or f"Conv_{i}"
        x, w = node.input[0], node.input[1]
        if any(d <= 0 for d in shapes.get(x, (-1,)) + shapes.get(w, (-1,))):
            raise SpecError(f"input: Conv node {name!r} has no static shape for {x!r} or "
                            f"{w!r}; {SHAPE_HINT}")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        nd = len(shapes[x]) - 2
        auto_pad = attrs.get("auto_pad", b"NOTSET").decode()
        padding: ListLike = {
            "SAME_UPPER": "same",
            "SAME_LOWER": "same_lower",
            "VALID": "valid",
        }.get(auto_pad, list(attrs.get("pads", [0] * (2 * nd))))
        found.append(
            (
                name,
                make_spec(
                    mode=mode,
                    input=shapes[x],
                    kernel=shapes[w],
                    padding=padding,
                    stride=list(attrs.get("strides", [1] * nd)),
                    dilation=list(attrs.get("dilations", [1] * nd)),
                    groups=int(attrs.get("group", 1)),
                    dtype=dtypes.get(x, "float32"),
                    bias=len(node.input) > 2 and bool(node.input[2]),
                ),
            )
        )
    if not found:
        raise SpecError(f"spec: {path} has no Conv node")
    return found
