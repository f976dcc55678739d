"""The probe's small vocabulary of failures, with messages safe to show (no DSN, no password)."""

from __future__ import annotations

import enum


class ProbeFailure(enum.StrEnum):
    DSN_INVALID = "DsnInvalid"
    AUTHENTICATION_FAILED = "AuthenticationFailed"
    DATABASE_UNREACHABLE = "DatabaseUnreachable"
    PERMISSION_DENIED = "PermissionDenied"
    PROBE_FAILED = "ProbeFailed"


class ProbeError(Exception):
    """A probe or a termination failed; ``failure`` classifies it, the message is redacted."""

    def __init__(self, failure: ProbeFailure, message: str) -> None:
        super().__init__(message)
        self.failure = failure
