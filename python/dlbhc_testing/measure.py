"""How the benchmarks summarise what they time."""
import numpy as np


def latency_summary(ms):
    """p50, p99, mean and max of a list of latencies (ms), as floats."""
    ms = np.asarray(ms, dtype=np.float64)
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "mean": float(ms.mean()), "max": float(ms.max())}
