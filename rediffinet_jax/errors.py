"""The package's own exception types: bad data names the case and the file."""

from __future__ import annotations


class RediffinetError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(RediffinetError, ValueError):
    """A configuration or argument that cannot be used (unknown key, bad value, bad shape)."""


class CaseError(RediffinetError):
    """A case on disk that cannot be used.

    Attributes:
      case: the case id (folder name), or None when the problem is not tied to one case.
      path: the offending file or folder, or None.
    """

    def __init__(self, message: str, case: str | None = None, path: str | None = None):
        self.case, self.path = case, path
        where = []
        if case is not None:
            where.append(f"case {case}")
        if path is not None:
            where.append(f"file {path}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)
