"""Exceptions that carry a message meant for the user.

The CLI prints these as one line and exits non-zero; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class PyrovaeError(Exception):
    """Base class for errors caused by the user's input, data or files."""


class InvalidDataError(PyrovaeError, ValueError):
    """Data has the wrong shape, dtype, non-finite values or values outside the support."""


class DatasetNotFoundError(PyrovaeError, FileNotFoundError):
    """A dataset is not on disk where it was looked for and cannot be downloaded."""


class CheckpointError(PyrovaeError):
    """A checkpoint is missing, corrupted, unsafe or does not match the configuration."""


class ConfigError(PyrovaeError, ValueError):
    """A configuration value is unknown or out of range."""


class TrainingDivergedError(PyrovaeError):
    """The loss became NaN or infinite, or grew far past its start."""


class TrainingInterrupted(PyrovaeError):
    """SIGINT or SIGTERM arrived; a checkpoint of the last finished step was written."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.signal_number = signal_number
