"""store: the feature database extract.py writes and search reads.

One database per collection: per image its fc7 row, latent activations,
packed hash code and info record (path, label, input position), plus an
optional PCA re-rank store; crash-safe appends, read-modify-write metadata
that several processes can share, shards merged in input order.  Never
imports Caffe (search and storage are tested without a net).

    database    FeatureStore: the schema and metadata, revision, appends,
                fc7 rows through a memory map, codes, infos, labels;
                check_compatible (may two databases or a model and a
                database be used together?)
    backends    the keyed tables' engines, LMDB and LevelDB, behind one
                small interface (get, read_rows, scan, atomic commit)
    pca_rows    the PCA re-rank store: the projection and every image's
                projected fc7 in flat rows, built, replaced, removed, and
                extended by each append (FeatureStore inherits it)
    live        which rows are live: tombstones (removed ids, committed like
                appends), stable ids (never reused; the id map compaction
                writes), live_mask(), the one-writer lock (writer_lock)
    compact     the database rewritten without its removed rows beside the
                old one, then switched in (kill -9 safe; recover_switch)
    merge       shard databases (extract.py --shard, the Ray job's shards)
                joined into one in input order, resumable

Public surface: FeatureStore, MetaFields, check_compatible,
COMPATIBILITY_FIELDS, merge, compact, recover_switch, writer_lock,
lock_path, the file names FC7_FILE and PCA_PREFIX, the
backends by name (BACKENDS) and the defaults of a new database
(DEFAULT_BACKEND, DEFAULT_FC7_DTYPE).
"""
from .backends import BACKENDS, DEFAULT_BACKEND
from .database import (COMPATIBILITY_FIELDS, DEFAULT_FC7_DTYPE, FC7_FILE, FeatureStore, MetaFields,
                       check_compatible)
from .compact import compact, recover_switch
from .live import lock_path, writer_lock
from .merge import merge
from .pca_rows import PCA_PREFIX

__all__ = ["BACKENDS", "COMPATIBILITY_FIELDS", "DEFAULT_BACKEND", "DEFAULT_FC7_DTYPE", "FC7_FILE",
           "FeatureStore", "MetaFields", "PCA_PREFIX", "check_compatible", "compact", "lock_path",
           "merge", "recover_switch", "writer_lock"]
