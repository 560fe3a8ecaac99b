"""Errors meant for users: one line that says what is wrong and how to fix it."""


class UserError(Exception):
    """A mistake in the user's input (config, arguments, data); printed as one line, no traceback."""


class ConfigError(UserError):
    """A configuration key or value that cannot be accepted."""
