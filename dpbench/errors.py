"""The error every module raises for a bad setting: a leaf module, so nothing imports config.py for it."""


class ConfigError(ValueError):
    """A setting has a value dpbench refuses; the message names the setting and what is allowed."""


def as_config_error(call, *args, naming: str | None = None, **kwargs):
    """``call(*args, **kwargs)``; a ValueError from checking a setting becomes a one-line
    :class:`ConfigError`. With ``naming`` (e.g. ``"model."``), only one whose message names such a
    setting: any other ValueError is an internal error and keeps its traceback."""
    try:
        return call(*args, **kwargs)
    except ConfigError:
        raise
    except ValueError as error:
        if naming is not None and naming not in str(error):
            raise
        raise ConfigError(" ".join(str(error).split())) from error


def check_choice(setting: str, value, allowed) -> None:
    """Refuse ``setting=value`` unless ``value`` is one of ``allowed``, naming them.

    >>> check_choice("optimizer.name", "lion", ("sgd", "adam"))
    Traceback (most recent call last):
    ...
    dpbench.errors.ConfigError: optimizer.name='lion' is not allowed; choose one of sgd, adam
    """
    if value not in allowed:
        raise ConfigError(f"{setting}={value!r} is not allowed; choose one of {', '.join(allowed)}")
