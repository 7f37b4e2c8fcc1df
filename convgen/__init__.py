"""convgen: optimized convolution kernels (true convolution or cross-correlation), via TVM."""

__version__ = "0.1.0"

from convgen.errors import (
    ConvgenError,
    SpecError,
    ToolchainError,
    UnsupportedError,
    VerificationError,
)
from convgen.runtime import BoundKernel, Kernel, Model, load
from convgen.spec import ConvSpec, make_spec

__all__ = [
    "BoundKernel",
    "ConvSpec",
    "ConvgenError",
    "Kernel",
    "Model",
    "SpecError",
    "ToolchainError",
    "UnsupportedError",
    "VerificationError",
    "__version__",
    "load",
    "make_spec",
]
