"""The one exception a user can cause and fix."""


class MoecError(Exception):
    """An error the user can fix; the CLI and train.py print its message on one line and exit 2."""
