"""User mistakes surface as one line and exit code 2, never as a traceback."""


class UserError(Exception):
    """Bad input from the user: printed as a single line by run.py, exit code 2."""
