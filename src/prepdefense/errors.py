"""Errors a user can fix. The CLI prints them as one line and exits non-zero."""


class PrepDefenseError(Exception):
    """Base class of the errors that mean 'fix your input', not 'bug'."""


class DataError(PrepDefenseError):
    """A missing or empty image folder, a bad labels.csv, no readable image."""


class ModelUnavailableError(PrepDefenseError):
    """A model whose code or weights are not installed (nothing downloads at run time)."""
