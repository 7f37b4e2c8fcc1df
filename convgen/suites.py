"""Named benchmark suites (`--suite NAME`): the layers convgen is measured on."""

from __future__ import annotations

from convgen.errors import SpecError
from convgen.spec import ConvSpec, make_spec

# ResNet-50 (batch 1 unless said): C, HxW, K, kernel, stride, pad, groups, batch.
RESNET50 = [
    (3, 224, 64, 7, 2, 3, 1, 1),
    (64, 56, 64, 3, 1, 1, 1, 1),
    (64, 56, 256, 1, 1, 0, 1, 1),
    (256, 56, 64, 1, 1, 0, 1, 1),
    (128, 28, 128, 3, 1, 1, 1, 1),
    (256, 14, 256, 3, 1, 1, 1, 1),
    (512, 7, 512, 3, 1, 1, 1, 1),
    (256, 28, 256, 3, 1, 1, 256, 1),  # depthwise
    (64, 56, 64, 3, 1, 1, 1, 8),  # batch 8
]

SUITES = {"resnet50": RESNET50}


def suite_specs(
    name: str,
    modes: tuple[str, ...] = ("conv", "corr"),
    layouts: tuple[str, ...] = ("NCHW", "NHWC"),
    dtype: str = "float32",
) -> list[ConvSpec]:
    """Every layer of the suite in each layout and mode."""
    try:
        layers = SUITES[name]
    except KeyError:
        raise SpecError(f"suite: {name!r} is not one of {', '.join(SUITES)}") from None
    specs = []
    for c, hw, k, r, s, p, g, n in layers:
        for layout in layouts:
            for mode in modes:
                last = layout == "NHWC"
                specs.append(make_spec(
                    mode=mode,
                    input=f"{n}x{hw}x{hw}x{c}" if last else f"{n}x{c}x{hw}x{hw}",
                    kernel=f"{k}x{r}x{r}x{c // g}" if last else f"{k}x{c // g}x{r}x{r}",
                    stride=s, padding=p, groups=g, layout=layout, dtype=dtype,
                ))
    return specs
