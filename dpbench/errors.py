"""The error every module raises for a bad setting: a leaf module, so nothing imports config.py for it."""


class ConfigError(ValueError):
    """A setting has a value dpbench refuses; the message names the setting and what is allowed."""


def as_config_error(call, *args, **kwargs):
    """``call(*args, **kwargs)``; a ValueError from checking a setting (its message names the setting)
    becomes a one-line :class:`ConfigError`."""
    try:
        return call(*args, **kwargs)
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(str(error)) from error
