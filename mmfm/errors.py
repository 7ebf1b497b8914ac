"""Exceptions mmfm raises for bad input, so callers can catch one family and users read one clear message."""


class MMFMError(Exception):
    """Base class of every error mmfm raises on purpose."""


class ConfigError(MMFMError, ValueError):
    """A config key, value or combination that cannot build a model."""


class InputError(MMFMError, ValueError):
    """An image, audio clip or text that cannot be turned into tokens."""


class CheckpointError(MMFMError, RuntimeError):
    """A checkpoint that is missing, unreadable or does not fit the model."""
