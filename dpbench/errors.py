"""The error every module raises for a bad setting: a leaf module, so nothing imports config.py for it."""


class ConfigError(ValueError):
    """A setting has a value dpbench refuses; the message names the setting and what is allowed."""
