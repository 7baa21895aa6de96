"""dlbhc.search.params (one set of search parameters: names, defaults, the
one validation, the radius clamp) and dlbhc.cli's search options, integer
types and error style, as every script uses them."""
import logging

import pytest

from dlbhc import cli
from dlbhc.errors import UserError
from dlbhc.search.params import DEFAULT_TOP_K, SearchParams, default_min_candidates, radius_limit


def test_defaults_are_stated_once():
    params = SearchParams()
    assert (params.top_k, params.candidates, params.max_radius) == (DEFAULT_TOP_K, None, None)
    assert params.min_candidates == default_min_candidates(DEFAULT_TOP_K) == 2 * DEFAULT_TOP_K
    assert SearchParams(top_k=7, candidates=3).min_candidates == 3
    assert SearchParams(top_k=None).min_candidates == 0      # rank every candidate


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=0), "top_k must be at least 1 (got 0)"),
    (dict(candidates=0), "candidates must be at least 1 (got 0)"),
    (dict(max_radius=-1), "max_radius must be at least 0 (got -1)"),
    (dict(top_k="10"), "top_k must be an integer"),
    (dict(top_k=True), "top_k must be an integer"),
])
def test_a_broken_rule_names_the_parameter(kwargs, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SearchParams(**kwargs)


def test_limits_of_a_server():
    params = SearchParams(top_k=50, candidates=500)
    assert params.within(max_top_k=50, max_candidates=500) is params
    with pytest.raises(UserError, match="top_k must be between 1 and 10"):
        params.within(max_top_k=10)
    with pytest.raises(UserError, match="candidates must be between 1 and 100"):
        params.within(max_candidates=100)


def test_the_radius_is_clamped_to_the_code_width_in_one_place():
    assert radius_limit(None, 48) == 48
    assert radius_limit(100, 48) == 48
    assert radius_limit(-3, 48) == 0
    assert SearchParams(max_radius=5).radius_limit(48) == 5


def parser_with_search_options(**kwargs):
    p = cli.ArgumentParser("test")
    cli.add_search_arguments(p, **kwargs)
    return p


def test_search_options_make_search_params():
    p = parser_with_search_options()
    args = p.parse_args(["--top-k", "5", "--candidates", "40", "--max-radius", "3"])
    assert cli.search_params(p, args) == SearchParams(5, 40, 3)
    assert cli.search_params(p, p.parse_args([])) == SearchParams()


def test_earlier_spellings_stay_accepted_and_errors_name_them(capsys):
    p = parser_with_search_options(top_k=1000, aliases={"top_k": ["--k"],
                                                        "candidates": ["--min-candidates"]})
    args = p.parse_args(["--k", "3", "--min-candidates", "6"])
    assert cli.search_params(p, args) == SearchParams(3, 6)
    assert cli.search_params(p, p.parse_args([])).top_k == 1000
    with pytest.raises(SystemExit) as exit_:
        cli.search_params(p, p.parse_args(["--k", "0"]))
    assert exit_.value.code == 2
    assert "error: --top-k/--k must be at least 1 (got 0)" in capsys.readouterr().err


def test_one_error_style_for_command_lines_and_user_errors(capsys):
    p = cli.ArgumentParser("test")
    p.add_argument("--n", type=cli.positive_int)
    p.add_argument("--m", type=cli.non_negative_int)
    assert p.parse_args(["--n", "1", "--m", "0"]).n == 1
    for argv, message in ((["--n", "0"], "must be at least 1 (got 0)"),
                          (["--m", "-1"], "must be at least 0 (got -1)"),
                          (["--n", "x"], "'x' is not a whole number")):
        with pytest.raises(SystemExit) as exit_:
            p.parse_args(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "usage:" in err and "error: " in err and message in err

    def main(argv):
        raise UserError("the database is gone")
    logger = logging.getLogger("dlbhc")
    handlers = list(logger.handlers)
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.run(main)
    finally:   # run_main's stderr handler would outlive capsys's stream
        logger.handlers[:] = handlers
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == "error: the database is gone"
