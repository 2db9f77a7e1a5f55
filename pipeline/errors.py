class InputError(Exception):
    """Bad input from the user (params, files, shapes). Commands report it in one line and exit 2."""
