def error_line(message: str) -> str:
    """`error: <message>` in one line, whatever line breaks a library's message holds."""
    return f"error: {' '.join(message.split())}"


class InputError(Exception):
    """Bad input from the user (params, files, shapes). Commands report it in one line and exit 2."""


class RunError(RuntimeError):
    """A run that cannot go on although its input was valid. Commands report it in one line and exit 1."""


class TrainingError(RunError):
    """A non-finite loss; the last good checkpoint is kept."""


class ParityError(RunError):
    """The exported graph does not reproduce the torch model; no file is left behind."""
