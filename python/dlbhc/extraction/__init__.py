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
    changes     a database kept in step with its collection: remove_images
                (ids or paths), sync (new files added, changed ones
                re-extracted in place of their record, vanished ones
                removed; stat only for unchanged files), plan_sync, SyncReport
    netcopy     NetCopy: a copy of the driver's checked net built in another
                process (a forward worker, a Ray actor), single-threaded on
                the CPU

Public surface: extract, extract_items, run_extraction, ExtractionReport,
NetCopy, open_or_create_store, parse_shard, select_inputs, input_triples,
the three defaults, and remove_images, sync, plan_sync, SyncReport,
ids_of_targets, file_stat.  Caffe is imported only when a net is built.
"""
from .changes import SyncReport, file_stat, ids_of_targets, plan_sync, remove_images, sync
from .netcopy import NetCopy
from .pipeline import (DEFAULT_BATCH_SIZE, DEFAULT_COMMIT_SECONDS, DEFAULT_WORKERS,
                       ExtractionReport, extract, extract_items, input_triples,
                       open_or_create_store, parse_shard, run_extraction, select_inputs)

__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_COMMIT_SECONDS", "DEFAULT_WORKERS", "ExtractionReport",
           "NetCopy", "SyncReport", "extract", "extract_items", "file_stat", "ids_of_targets",
           "input_triples", "open_or_create_store", "parse_shard", "plan_sync", "remove_images",
           "run_extraction", "select_inputs", "sync"]
