"""The command lines' shared pieces: one parser, one error style, the search
options, `--gpu [ID]`, integer types, and how a script runs.

Every script in python/ is a thin argparse front end over the package:

    from dlbhc import cli

    def parse_args(argv):
        p = cli.ArgumentParser(__doc__)
        cli.add_search_arguments(p)
        args = p.parse_args(argv)
        args.search = cli.search_params(p, args)
        return args

    if __name__ == "__main__":
        cli.run(main)

One error style.  A mistake in the command line (argparse's own checks,
cli's integer types, SearchParams's rules) and a mistake found later
(errors.UserError, raised anywhere in the library) are both printed as
`error: MESSAGE` on stderr, without a traceback, and the script exits with
status 2; a command-line mistake shows the usage line above it.

The sys.path preamble.  There is none: `python python/x.py` puts the
script's own folder, python/, first on sys.path, so the scripts import
dlbhc as they are; scripts elsewhere (data/, benchmarks/) import the package
`make venv` installs (editable, pyproject.toml), and the tests put python/
first in tests/conftest.py.

This is the top room of the layering (.importlinter): it may import every
room, and none imports it.
"""
import argparse
import sys

from .errors import UserError, run_main
from .search.params import DEFAULT_TOP_K, SearchParams

# How the command lines spell SearchParams's fields.
SEARCH_OPTIONS = {"top_k": "--top-k", "candidates": "--candidates", "max_radius": "--max-radius"}


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with the scripts' conventions: the module
    docstring shown as written (RawDescriptionHelpFormatter) and errors in
    the one style (see the module docstring)."""

    def __init__(self, description=None, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(description=description, **kwargs)

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def run(main):
    """Run a script's main(argv) as errors.run_main does and exit with its
    status: UserError printed as `error: MESSAGE`, status 2."""
    sys.exit(run_main(main))


# ---- integer types ----------------------------------------------------------------

def _integer(text, low):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low} (got {value})")
    return value


def positive_int(text):
    """argparse type: an integer of 1 or more."""
    return _integer(text, 1)


def non_negative_int(text):
    """argparse type: an integer of 0 or more."""
    return _integer(text, 0)


# ---- the search's options -----------------------------------------------------------

def add_search_arguments(parser, top_k=DEFAULT_TOP_K, top_k_help="results per query",
                         aliases=None):
    """--top-k (default `top_k`), --candidates and --max-radius, SearchParams's
    fields (dest top_k, candidates, max_radius); aliases: {field: [other
    spellings]} a script keeps accepting (evaluate.py's --k, --min-candidates).
    Check them with search_params()."""
    aliases = aliases or {}
    # How search_params names an option in its messages: every spelling.
    parser.search_spellings = {field: "/".join([option, *aliases.get(field, ())])
                               for field, option in SEARCH_OPTIONS.items()}
    group = parser.add_argument_group("search")
    group.add_argument(SEARCH_OPTIONS["top_k"], *aliases.get("top_k", ()), dest="top_k",
                       type=int, default=top_k, metavar="K",
                       help=f"{top_k_help} (default {top_k})")
    group.add_argument(SEARCH_OPTIONS["candidates"], *aliases.get("candidates", ()),
                       dest="candidates", type=int, metavar="N",
                       help="the coarse stage gathers at least this many images "
                            "(default 2 x top-k)")
    group.add_argument(SEARCH_OPTIONS["max_radius"], *aliases.get("max_radius", ()),
                       dest="max_radius", type=int, metavar="R",
                       help="never look beyond this Hamming radius")


def search_params(parser, args):
    """The SearchParams of parsed arguments (add_search_arguments); a broken
    rule is a command-line error naming the option (--top-k must be ...)."""
    try:
        return SearchParams(args.top_k, args.candidates, args.max_radius)
    except UserError as err:
        message = str(err)
        spellings = getattr(parser, "search_spellings", SEARCH_OPTIONS)
        for field, option in spellings.items():
            if message.startswith(field + " "):
                message = option + message[len(field):]
        parser.error(message)


def add_rerank_arguments(parser):
    """--rerank and --exact-top: what the fine stage ranks by, a property of
    the database opened (serving.retrieval.Retriever), not of one query."""
    from .search.rerank import DEFAULT_EXACT_TOP
    from .serving.retrieval import FINE_STAGES
    parser.add_argument("--rerank", choices=FINE_STAGES, default="auto",
                        help="fine stage: fc7 distances, the stored latent activations, "
                             "asymmetric (the query's latent against the stored codes), the "
                             "database's PCA store (compress.py), none (Hamming order, latent "
                             "tie-break), hamming (Hamming order alone), or auto (default): the "
                             "stage train.py recorded for the model (rerank.json), else PCA "
                             "when the database has one, else fc7")
    parser.add_argument("--exact-top", type=non_negative_int, metavar="N",
                        help="with PCA: rank the best N again by exact fc7 distance "
                             f"(default {DEFAULT_EXACT_TOP}; 0: PCA ranking only)")


# ---- the net --------------------------------------------------------------------------

def add_gpu_argument(parser):
    """The `--gpu [ID]` switch of Caffe's own Python scripts (nets.caffe_env.set_mode
    takes its value)."""
    parser.add_argument("--gpu", type=int, nargs="?", const=0, default=None,
                        metavar="ID", help="run the net on GPU ID (default 0 "
                        "when given without ID); CPU otherwise")
