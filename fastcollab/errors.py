"""The one exception type that user-facing code raises for bad input.

Every message names the problem and the fix; the CLIs print it as one line and exit with status 2
instead of a traceback.
"""


class FastcollabError(Exception):
    """Bad input or an impossible configuration, with a message that says what to do instead."""
