"""extraction: a whole image collection through the net into a feature
database (store), resumable, crash-safe, in input order; extract.py's
library, and what the Ray job (scale.ray_extract) runs on each shard.

    pipeline    extract() and extract_items(): inputs listed and sharded,
                images decoded in worker processes, the net's forward in
                the workers (CPU) or the main process (GPU, tuned BLAS
                threads), batches committed together every few seconds,
                skipped images listed; the defaults every way of running
                an extraction shares (DEFAULT_BATCH_SIZE,
                DEFAULT_COMMIT_SECONDS, DEFAULT_WORKERS)
    netcopy     NetCopy: a copy of the driver's checked net built in another
                process (a forward worker, a Ray actor), single-threaded on
                the CPU

Public surface: extract, extract_items, ExtractionReport, NetCopy,
open_or_create_store, parse_shard, select_inputs, input_triples and the
three defaults.  Caffe is imported only when a net is built.
"""
from .netcopy import NetCopy
from .pipeline import (DEFAULT_BATCH_SIZE, DEFAULT_COMMIT_SECONDS, DEFAULT_WORKERS,
                       ExtractionReport, extract, extract_items, input_triples,
                       open_or_create_store, parse_shard, select_inputs)

__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_COMMIT_SECONDS", "DEFAULT_WORKERS", "ExtractionReport",
           "NetCopy", "extract", "extract_items", "input_triples", "open_or_create_store",
           "parse_shard", "select_inputs"]
