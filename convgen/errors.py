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


def tvm_reason(err: BaseException) -> str:
    """What a TVM error says went wrong, in one line for an `UnsupportedError`: its
    last line (TVM's messages end with the reason), past the footer its printed IR
    ends with; where it names an offending call, its first line and the call's
    operator ("CodeGenVM cannot emit this Relax operator ... Offending call:
    R.nn.conv2d_transpose")."""
    lines = [line.strip() for line in str(err).splitlines()
             if line.strip() and not line.strip().startswith("# Metadata omitted")]
    if not lines:
        return type(err).__name__
    if "Offending call:" in lines:
        at = lines.index("Offending call:")
        call = lines[at + 1].split("(")[0] if at + 1 < len(lines) else ""
        return f"{lines[0]} Offending call: {call}".strip()
    return lines[-1]
