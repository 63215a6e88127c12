"""Errors raised for bad user data."""


class DataError(ValueError):
    """User data is malformed; the message names the file, the 1-based line and what is wrong."""
