"""Errors a user can fix. The CLI prints their message as one line and exits non-zero."""


class UserError(Exception):
    """Bad input: the message names what is wrong and how to fix it."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """An impossible or unknown setting (crop spec, hyperparameter, config key)."""


class DataError(UserError):
    """Missing, unreadable or malformed data (archive, image, .beton file)."""

    exit_code = 3


class DataNotFoundError(DataError):
    """The source data (archive, folder, data root) is not on this machine."""
