"""The one exception type for problems the user can fix.

The CLI prints its message as a single line and exits with status 2; anything
else escaping a command is an internal error (status 1).
"""


class SwtoolError(Exception):
    """A user-fixable problem: bad path, unsupported model, corrupt file, bad option."""
