"""Errors that carry a message a user can act on.

Every failure the command line reports without a traceback is an :class:`EmoscopeError`;
anything else is a bug.
"""

from __future__ import annotations


class EmoscopeError(Exception):
    """Base class: the message alone tells the user what went wrong and what to do."""


class UnknownModelError(EmoscopeError):
    pass


class MissingPackageError(EmoscopeError):
    pass


class UnsupportedArchitectureError(EmoscopeError):
    pass


class UnknownEmotionError(EmoscopeError):
    pass


class BankMismatchError(EmoscopeError):
    """A vector bank was built for a different model (or layer set) than the one in use."""


class RunDirectoryError(EmoscopeError):
    """An output directory holds a different run, or is not a run directory at all."""


class CorpusFormatError(EmoscopeError):
    """A corpus file has a bad line: names the file, the line number and the field."""

    def __init__(self, path: object, line: int, field: str, problem: str) -> None:
        self.path, self.line, self.field, self.problem = str(path), line, field, problem
        super().__init__(f"{path}:{line}: field '{field}': {problem}")
