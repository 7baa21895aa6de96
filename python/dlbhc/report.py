"""How library code tells people what it is doing: one logger tree.

Library functions never take a `log=` or `stream=` argument. A module says
what happens through its own logger::

    from ..report import get_logger
    log = get_logger(__name__)
    log.info("skipped %s: %s", path, why)

and long jobs show their progress line (progress.Progress) on the stream
the messages go to. The scripts (errors.run_main) call `configure()` once,
which prints every message of the "dlbhc" tree as a plain line on stderr;
a program that uses the package as a library decides where the messages go
with Python's logging (they propagate to its root logger; nothing is printed
when it configures nothing, as for any library). Tests read them with
pytest's `caplog`.
"""
import logging
import sys

ROOT_LOGGER = "dlbhc"
_HANDLER_NAME = "dlbhc-plain-stderr"


def get_logger(name):
    """The logger of a module of the package (`__name__`), in the dlbhc tree."""
    if name != ROOT_LOGGER and not name.startswith(ROOT_LOGGER + "."):
        name = f"{ROOT_LOGGER}.{name}"
    return logging.getLogger(name)


def configure(stream=None, level=logging.INFO):
    """Messages of the dlbhc tree as plain lines on `stream` (stderr), once:
    calling it again only moves them to the new stream and level."""
    logger = logging.getLogger(ROOT_LOGGER)
    logger.setLevel(level)
    for handler in logger.handlers:
        if handler.get_name() == _HANDLER_NAME:
            handler.setStream(stream or sys.stderr)
            handler.setLevel(level)
            return handler
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(level)
    logger.addHandler(handler)
    return handler


def message_stream():
    """The stream configure() prints messages on (stderr when it was not
    called): progress lines go there too, so both interleave in order."""
    for handler in logging.getLogger(ROOT_LOGGER).handlers:
        if handler.get_name() == _HANDLER_NAME:
            return handler.stream
    return sys.stderr
