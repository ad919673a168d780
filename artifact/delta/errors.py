"""Why a delta could not be applied: one base type with a code, one subclass per cause.

The CLI and the edge agent branch on the type (or ``code``), never on the wording; the
message says what happened and what to do about it.
"""

from __future__ import annotations


class DeltaError(Exception):
    """A delta payload could not be built or applied."""

    code = "delta_error"


class CorruptPatchError(DeltaError):
    """The payload is damaged or truncated (a checksum or a structural check failed)."""

    code = "corrupt_patch"


class WrongBaseError(DeltaError):
    """The file the delta is applied to is not the base it was computed against."""

    code = "wrong_base"


class UnsupportedPatchError(DeltaError):
    """The payload uses a format version or feature this build does not know."""

    code = "unsupported_patch"


class TargetMismatchError(DeltaError):
    """The payload builds a different file than the one the caller expects."""

    code = "target_mismatch"
