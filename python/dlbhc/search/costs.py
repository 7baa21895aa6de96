"""The coarse stage's cost model: measured unit costs that choose its strategy.

HashIndex.coarse picks, per query, between probing shells, the pivot runs
and one scan of every unique code by comparing what each would cost with
these figures.  They live apart from the index because they are data, not
mechanism: re-measured on another machine (`python
benchmarks/bench_search.py --calibrate`), only this module changes, and
tests replace an index's `costs` to force one strategy.  Only their ratios
matter: they decide which exact strategy runs, never what it returns.
"""
import numpy as np

# Unit costs of the coarse stage, in nanoseconds, by code width in 64-bit
# words, measured with `python benchmarks/bench_search.py --calibrate --sizes
# 1000000 --bits 48,128,256` (clustered synthetic codes, U ~ 0.7-0.8M unique)
# on the project's 2-core build machine with nothing else running, numpy 2.4,
# after the exhaustive scan moved to the project's own C kernel
# (csrc/hamming_ball.c).
#   probe   one enumerated flip pattern: XOR, hash (codes over 64 bits),
#           binary search among the unique codes, verify
#   gather  one unique code reached through the pivot runs: gather, XOR,
#           popcount, histogram
#   scan    one unique code in the exhaustive scan (the C pass, the stopping
#           rule, the selection and expansion of the ball, per unique code,
#           for a 1000-candidate search)
#   step    fixed overhead of one growing step of the pivot-run scan
# Other widths interpolate (and beyond 4 words keep the 4-word figures).
COST_WORDS = (1, 2, 4)
COST_NS = {"probe": (62.0, 215.5, 225.7),
           "gather": (7.3, 12.5, 17.5),
           "scan": (0.8, 1.1, 1.8),
           "step": (59.5e3, 72.1e3, 108.8e3)}
# Searching through the pivot runs costs several growing steps plus the
# bounds search that sizes them, and more than the unit costs say with
# caches cold between queries (as in a service, or bench_search's shuffled
# methods).  Measured that way, quiet, per query at 48 / 128 bits: at 1M
# codes the runs took 1.08 / 1.28 ms where one C scan took 0.79 / 0.91; at
# 2.5M the runs 0.92 / 1.39 ms, the scan 1.45 / 1.98.  The crossover lies
# between 9-15 and 20-28 steps' worth: when a scan of every unique code
# costs less than this many steps, the runs are not even considered.
RUNS_OVERHEAD_STEPS = 16
# Enumerating a shell costs memory for its flip masks; beyond this many
# patterns a scan is always cheaper anyway.
MAX_SHELL_PROBES = 1 << 18


def unit_costs(n_words):
    """{probe, gather, scan, step: ns} for codes of n_words 64-bit words."""
    return {name: float(np.interp(n_words, COST_WORDS, values))
            for name, values in COST_NS.items()}
