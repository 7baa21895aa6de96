"""Reading `caffe train`'s log: the progress lines and the learning curve.

Caffe's solver logs (glog) lines like

    I1127 10:23:45.123 solver.cpp:218] Iteration 850 (1.88 iter/s, 26.6s/50 iters), loss = 1.17
    I1127 10:23:45.123 solver.cpp:237]     Train net output #0: loss = 1.21 (* 1 = 1.21 loss)
    I1127 10:23:45.124 sgd_solver.cpp:105] Iteration 850, lr = 0.0935
    I1127 10:24:02.551 solver.cpp:330] Iteration 1000, Testing net (#0)
    I1127 10:24:09.917 solver.cpp:397]     Test net output #0: accuracy = 0.6123
    I1127 10:24:09.917 solver.cpp:397]     Test net output #1: loss = 1.08 (* 1 = 1.08 loss)

CaffeLog keeps the per-iteration curve as Caffe's tools/extra/parse_log.py
does: train rows (iteration, seconds, learning rate, the train net's outputs:
loss) and test rows (iteration, seconds, learning rate, the test net's
outputs: accuracy, loss), seconds counted from the first timestamped line.
Two differences, both on purpose: a train row takes the learning rate logged
for its own iteration (parse_log.py takes the previous display's and patches
the first rows), and lines are fed one at a time while Caffe runs, so the
same parser shows the progress (ITER_RE, TEST_RE) and records the curve.
"""
import csv
import re
from datetime import datetime
from pathlib import Path

# The solver's display line (smoothed loss): progress.
ITER_RE = re.compile(r"Iteration (\d+).*?, loss = ([-+0-9.eE]+|nan)")
# A test net output: progress and the test curve.
TEST_RE = re.compile(r"Test net output #\d+: (\w+) = ([-+0-9.eE]+|nan)")
# parse_log.py's expressions for the curve.
ITERATION_RE = re.compile(r"Iteration (\d+)")
TRAIN_OUTPUT_RE = re.compile(r"Train net output #(\d+): (\S+) = ([-+.\deE]+|nan)")
TEST_OUTPUT_RE = re.compile(r"Test net output #(\d+): (\S+) = ([-+.\deE]+|nan)")
LEARNING_RATE_RE = re.compile(r"Iteration (\d+), lr = ([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")
# glog's prefix: severity, [year,] month and day, time of day. glog before
# 0.7 (Caffe 1.0's logs) writes I1127 23:59:58.1; glog 0.7 and later, as
# in this project's build, put the year in: I20261127 23:59:58.1.
GLOG_TIME_RE = re.compile(r"^[IWEF](\d{4})?(\d{2})(\d{2}) (\d{2}):(\d{2}):(\d{2})\.(\d+)")

TRAIN_CURVE_FILE = "train_curve.csv"
TEST_CURVE_FILE = "test_curve.csv"
CURVE_COLUMNS = ("iteration", "seconds", "learning_rate")


def log_time(line):
    """The datetime of a glog line, or None. Without a year in the prefix
    it is put in 2000 (a leap year, for Feb 29)."""
    m = GLOG_TIME_RE.match(line)
    if not m:
        return None
    year, month, day, hour, minute, second, fraction = m.groups()
    return datetime(int(year or 2000), int(month), int(day), int(hour), int(minute),
                    int(second), int(fraction[:6].ljust(6, "0")))


class CaffeLog:
    """The curve of a `caffe train` log, fed line by line (`feed`)."""

    def __init__(self):
        self.train_rows = {}      # iteration -> {column: value}
        self.test_rows = {}
        self.iteration = None     # the latest "Iteration N" seen
        self.learning_rate = None
        self._start = None
        self._seconds = 0.0

    def feed(self, line):
        """Take one log line; returns ("train", iteration, loss) for a
        display line, ("test", iteration, name, value) for a test output,
        else None (what a progress display shows)."""
        when = log_time(line)
        if when is not None:
            self._start = self._start or when
            seconds = (when - self._start).total_seconds()
            # a run across New Year's Eve
            self._seconds = seconds if seconds >= 0 else seconds + 366 * 86400
        m = ITERATION_RE.search(line)
        if m:
            self.iteration = int(m.group(1))
        m = LEARNING_RATE_RE.search(line)
        if m:
            self.learning_rate = float(m.group(2))
            row = self.train_rows.get(int(m.group(1)))
            if row is not None:
                row["learning_rate"] = self.learning_rate
        if self.iteration is None:
            return None
        m = TRAIN_OUTPUT_RE.search(line)
        if m:
            self._row(self.train_rows)[m.group(2)] = float(m.group(3))
        m = TEST_OUTPUT_RE.search(line)
        if m:
            self._row(self.test_rows)[m.group(2)] = float(m.group(3))
        m = ITER_RE.search(line)
        if m:
            return ("train", int(m.group(1)), float(m.group(2)))
        m = TEST_RE.search(line)
        if m:
            return ("test", self.iteration, m.group(1), m.group(2))
        return None

    def _row(self, rows):
        if self.iteration not in rows:
            rows[self.iteration] = {"iteration": self.iteration,
                                    "seconds": round(self._seconds, 3),
                                    "learning_rate": self.learning_rate}
        return rows[self.iteration]

    @property
    def train(self):
        """The train rows in iteration order."""
        return [self.train_rows[i] for i in sorted(self.train_rows)]

    @property
    def test(self):
        """The test rows in iteration order."""
        return [self.test_rows[i] for i in sorted(self.test_rows)]

    def write_csv(self, folder):
        """train_curve.csv and test_curve.csv in `folder` (parse_log.py's
        two tables); returns {"train": path, "test": path}."""
        return {"train": str(write_rows(Path(folder) / TRAIN_CURVE_FILE, self.train)),
                "test": str(write_rows(Path(folder) / TEST_CURVE_FILE, self.test))}


def write_rows(path, rows):
    """Rows (dicts) as CSV: iteration, seconds, learning_rate, then the
    outputs in the order first seen."""
    columns = list(CURVE_COLUMNS)
    for row in rows:
        columns += [key for key in row if key not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def parse_log(lines):
    """A CaffeLog of a whole log (an iterable of lines, e.g. an open file)."""
    log = CaffeLog()
    for line in lines:
        log.feed(line)
    return log
