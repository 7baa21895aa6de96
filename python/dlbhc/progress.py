"""A small progress line for long jobs: count, rate (items/s) and ETA."""
import time

from .report import message_stream


def format_seconds(s):
    """Seconds as M:SS or H:MM:SS (for ETAs and durations)."""
    s = int(max(0, s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class Progress:
    """Prints `label  done/total  rate unit/s  ETA` to stderr, at most every
    `interval` seconds (a carriage-return line on a terminal, plain lines
    otherwise so logs stay readable)."""

    def __init__(self, total, label="", unit="img", interval=1.0, stream=None):
        self.total = total
        self.label = label
        self.unit = unit
        self.interval = interval
        self.stream = stream or message_stream()
        self.done = 0
        self.start = time.monotonic()
        self._last = 0.0
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    @property
    def rate(self):
        elapsed = time.monotonic() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def update(self, n=1):
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.interval or (self.total and self.done >= self.total):
            self._last = now
            self._print()

    def line(self):
        rate = self.rate
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            eta_s = format_seconds(eta) if eta != float("inf") else "--:--"
            pct = 100.0 * self.done / self.total
            return (f"{self.label} {self.done}/{self.total} ({pct:5.1f}%) "
                    f"{rate:8.1f} {self.unit}/s  ETA {eta_s}")
        return f"{self.label} {self.done} {rate:8.1f} {self.unit}/s"

    def _print(self):
        end = "\r" if self._tty else "\n"
        print(self.line(), end=end, file=self.stream, flush=True)

    def close(self):
        elapsed = time.monotonic() - self.start
        if self._tty:
            print(file=self.stream)
        print(f"{self.label} done: {self.done} {self.unit} in {format_seconds(elapsed)} "
              f"({self.rate:.1f} {self.unit}/s)", file=self.stream, flush=True)
