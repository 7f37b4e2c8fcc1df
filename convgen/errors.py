"""The errors convgen raises on purpose. The CLI turns each into one line and an exit code."""


class ConvgenError(Exception):
    """Base class: a problem the user can act on (never an internal bug)."""

    exit_code = 2


class SpecError(ConvgenError, ValueError):
    """The operator spec is invalid. The message names the field and the value."""


class TargetError(ConvgenError):
    """The target is not one convgen knows. The message names `target` and the value."""


class ArgumentError(ConvgenError, ValueError):
    """A kernel was called with arrays that do not match it (count, shape or dtype)."""


class ArtifactError(ConvgenError):
    """An artifact cannot be used: missing, damaged, or written by a newer convgen."""


class UnsupportedError(ConvgenError):
    """A valid spec or target that convgen cannot build (yet)."""


class ToolchainError(ConvgenError):
    """A tool or device convgen needs (TVM's runtime, nvcc, a GPU) is missing or failed."""


class VerificationError(ConvgenError):
    """The kernel's output does not match the references."""

    exit_code = 1
