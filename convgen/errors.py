"""The errors convgen raises on purpose. The CLI turns each into one line and an exit code."""


class ConvgenError(Exception):
    """Base class: a problem the user can act on (never an internal bug)."""

    exit_code = 2


class SpecError(ConvgenError, ValueError):
    """The operator spec is invalid. The message names the field and the value."""


class UnsupportedError(ConvgenError):
    """A valid spec or target that convgen cannot build (yet)."""


class ToolchainError(ConvgenError):
    """A tool convgen needs (TVM, nvcc, a GPU) is missing or failed."""


class VerificationError(ConvgenError):
    """The kernel's output does not match the references."""

    exit_code = 1
