"""Testing support, not shipped with the package (dlbhc never imports it,
.importlinter checks that): what the tests compare the library against and
the data the tests and benchmarks are made of.

    reference   brute-force truths: bit-by-bit Hamming distances, exhaustive
                search, the paper's evaluation figures, a numpy forward of
                the converted backbone
    synthetic   seeded synthetic data: clustered hash codes (the tests'
                small model and the benchmarks' Zipf-sized clusters), fc7
                rows from a fixed pool, feature databases written with the
                store
    server      python/serve.py run for real in a process of its own, and
                plain HTTP requests to it (tests and the serving benchmark)
    measure     how the benchmarks summarise latencies (p50, p99, mean, max)
"""
