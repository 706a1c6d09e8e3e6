"""The one exception for input a user can fix.

A flag, a config key, a path, a run folder or a file that is wrong is reported
as one sentence (`error: ...`, exit status 2, no traceback) by the command that
received it; anything else is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """Input the user can fix; the message is the whole report, so it says what to do."""
