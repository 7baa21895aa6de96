"""One exception type for mistakes a user can fix (wrong path, bad model...).

Scripts catch UserError and print its message without a traceback; anything
else is a bug and keeps its traceback.
"""
import sys


class UserError(Exception):
    """A problem with the user's input, with a message that says what to do."""


def run_main(main, argv=None):
    """Run a script's main(argv); turn UserError into a clear message, exit 2.
    The library's messages (report) are printed on stderr as plain lines."""
    from .report import configure
    configure()
    try:
        return main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
