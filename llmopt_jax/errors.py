"""One error family for every user-facing failure.

CLIs catch :class:`LlmoptError` and print its message as one line; anything else is a bug and keeps its
traceback. Messages name the file, key, tensor or shape at fault.
"""


class LlmoptError(Exception):
    """Base class of every error a user can cause with bad input."""


class ConfigError(LlmoptError):
    """An invalid or inconsistent configuration value."""


class MeshError(LlmoptError):
    """A device mesh that cannot be built from the requested axis sizes."""


class ShardingError(LlmoptError):
    """A tensor dimension that does not divide over the mesh axes it is mapped to."""


class DataError(LlmoptError):
    """Missing, unreadable or too-short input data."""


class CheckpointError(LlmoptError):
    """A checkpoint that cannot be restored into the current run."""
