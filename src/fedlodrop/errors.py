"""The one exception type for a user's mistake: the CLI turns it into one line and exit code 2."""


class UserError(Exception):
    """Bad input from the user (config, data, model name): message is shown as-is, exit 2."""


class RoundFailed(Exception):
    """Too few devices returned a usable update; the last checkpoint is left as it was."""
