"""Error types carrying a user-facing message, a hint and the documented exit code."""

from __future__ import annotations

# Exit codes are a contract (shared/DESIGN.md, README): scripts branch on them.
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_RESOURCE_ABSENT = 4
EXIT_FAILED = 1


class KvprofError(Exception):
    """An error the CLI prints as ``Error:`` / ``Hint:`` lines and turns into an exit code."""

    exit_code: int = EXIT_FAILED

    def __init__(self, message: str, hint: str | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class UsageError(KvprofError):
    """The command line itself is wrong (conflicting or out-of-range options)."""

    exit_code = EXIT_USAGE


class BadInputError(KvprofError):
    """An input file or value is missing, malformed or of the wrong kind."""

    exit_code = EXIT_BAD_INPUT


class ResourceAbsentError(KvprofError):
    """Something the command needs is not on this machine: a GPU, NVML, nixl, a cluster."""

    exit_code = EXIT_RESOURCE_ABSENT


class VerificationError(KvprofError):
    """Data moved by a benchmark did not arrive byte-exact; the timing is not a result."""

    exit_code = EXIT_FAILED
