"""Errors a user can cause and fix.

Every exception that derives from :class:`LenetError` is meant to reach the user as one line:
the CLI prints ``lenet: error: <message>`` and exits with a non-zero status, without a traceback.
Anything else is a bug in lenet and keeps its traceback.
"""

from __future__ import annotations


class LenetError(Exception):
    """A problem the user can fix (bad flag, missing data, bad file). The message says how."""

    exit_code = 2


class DataError(LenetError):
    """Dataset files are missing, corrupt, or fail their checksum."""


class IdxFormatError(DataError):
    """An IDX file is malformed: the message names the file and what is wrong with it."""


class ConfigError(LenetError):
    """A model or training configuration that cannot work."""


class CheckpointError(LenetError):
    """A run folder, checkpoint or weights file that cannot be used."""


class ImageError(LenetError):
    """An input image that cannot be read or used."""


class TrainingDiverged(LenetError):
    """The loss became NaN or infinite."""

    exit_code = 3


class Interrupted(LenetError):
    """Training was stopped with Ctrl-C after its last checkpoint was safely written."""

    exit_code = 130
