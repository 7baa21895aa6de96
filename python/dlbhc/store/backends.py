"""The two key-value engines a feature database's keyed tables live in:
LMDB (the default) and LevelDB, behind one small interface.

A backend holds the tables `TABLES` (meta, latent, code, info) and offers
get / get_many / read_rows (fixed-size records copied straight into an
array) / scan / write (one atomic batch) / commit (records plus a
read-modify-write of the metadata record, atomic) / close.  LMDB tables are
named sub-databases; LevelDB keys get the table name and a slash as prefix
(b"code/0000000001").  The engines' packages (lmdb, plyvel) are imported
when a backend opens.  What the records hold is database.py's business.
"""
import json

import numpy as np

from ..errors import UserError

TABLES = ("meta", "latent", "code", "info")
# The key of the metadata record in the meta table.
META_KEY = b"meta"
# LMDB reserves address space, not disk: 1 TiB holds 60M images of fc7.
LMDB_MAP_SIZE = 1 << 40


class LmdbBackend:
    """The tables as named sub-databases of one LMDB environment."""
    name = "lmdb"

    def __init__(self, path, readonly):
        import lmdb
        try:
            # readahead=False: searches read scattered records; the kernel's
            # readahead would pull in neighbours nobody asked for.
            self.env = lmdb.open(str(path), map_size=LMDB_MAP_SIZE, max_dbs=len(TABLES),
                                 readonly=readonly, readahead=False, subdir=True,
                                 create=not readonly)
            if readonly:
                self.dbs = {t: self.env.open_db(t.encode(), create=False) for t in TABLES}
            else:
                # All tables in one transaction: a reader sees all or none of them.
                with self.env.begin(write=True) as txn:
                    self.dbs = {t: self.env.open_db(t.encode(), txn=txn, create=True)
                                for t in TABLES}
        except lmdb.NotFoundError:
            raise UserError(f"{path} is not a complete feature database (its tables are "
                            "missing): it may still be being created") from None
        except lmdb.Error as err:
            raise UserError(f"cannot open LMDB feature store {path}: {err}") from err

    def get(self, table, k):
        with self.env.begin(db=self.dbs[table], buffers=False) as txn:
            return txn.get(k)

    def get_many(self, table, keys):
        """Values as bytes for keys (one read transaction; None for a missing key)."""
        with self.env.begin(db=self.dbs[table]) as txn:
            # One C call for every key: a top-1000 answer's info records in
            # 2.1 ms where a get() per key took 5.4 ms (2.5M records, loaded
            # machine).  getmulti leaves missing keys out: then key by key.
            found = txn.cursor().getmulti(keys)
            if len(found) == len(keys):
                return [v for _, v in found]
            return [txn.get(k) for k in keys]

    def read_rows(self, table, keys, out):
        """Copy fixed-size records straight into the rows of `out` (no parsing)."""
        row_bytes = out.dtype.itemsize * out.shape[1]
        view = out.view(np.uint8).reshape(out.shape[0], row_bytes)
        with self.env.begin(db=self.dbs[table], buffers=True) as txn:
            get = txn.get
            for i, k in enumerate(keys):
                buf = get(k)
                if buf is None:
                    raise KeyError(k)
                view[i] = np.frombuffer(buf, dtype=np.uint8)

    def scan(self, table):
        with self.env.begin(db=self.dbs[table]) as txn:
            for k, v in txn.cursor():
                yield k, v

    def write(self, items):
        """items: list of (table, key, value); one transaction."""
        with self.env.begin(write=True) as txn:
            for table, k, v in items:
                txn.put(k, v, db=self.dbs[table])

    def commit(self, items, change):
        """One write transaction: `items` and the metadata change(stored meta)
        returns.  LMDB admits one writer at a time (across processes too), so
        nobody changes the metadata between the read and the write."""
        with self.env.begin(write=True) as txn:
            meta = change(json.loads(txn.get(META_KEY, db=self.dbs["meta"])))
            for table, k, v in items:
                txn.put(k, v, db=self.dbs[table])
            txn.put(META_KEY, meta_bytes(meta), db=self.dbs["meta"])
        return meta

    def close(self):
        self.env.close()


class LevelDbBackend:
    """The tables in one LevelDB, keys prefixed with the table name and a slash."""
    name = "leveldb"

    def __init__(self, path, readonly):
        import plyvel
        try:
            self.db = plyvel.DB(str(path), create_if_missing=not readonly)
        except plyvel.Error as err:
            raise UserError(f"cannot open LevelDB feature store {path}: {err}") from err

    @staticmethod
    def _k(table, k):
        return table.encode() + b"/" + k

    def get(self, table, k):
        return self.db.get(self._k(table, k))

    def get_many(self, table, keys):
        return [self.db.get(self._k(table, k)) for k in keys]

    def read_rows(self, table, keys, out):
        row_bytes = out.dtype.itemsize * out.shape[1]
        view = out.view(np.uint8).reshape(out.shape[0], row_bytes)
        prefix = table.encode() + b"/"
        get = self.db.get
        for i, k in enumerate(keys):
            buf = get(prefix + k)
            if buf is None:
                raise KeyError(k)
            view[i] = np.frombuffer(buf, dtype=np.uint8)

    def scan(self, table):
        prefix = table.encode() + b"/"
        for k, v in self.db.iterator(prefix=prefix):
            yield k[len(prefix):], v

    def write(self, items):
        # transaction=True: LevelDB applies the whole batch atomically.
        with self.db.write_batch(transaction=True, sync=True) as wb:
            for table, k, v in items:
                wb.put(self._k(table, k), v)

    def commit(self, items, change):
        """items and change(stored meta), one batch.  A LevelDB is open in
        one process at a time (its LOCK file), so nobody else can write it
        between the read and the write."""
        meta = change(json.loads(self.get("meta", META_KEY)))
        self.write(list(items) + [("meta", META_KEY, meta_bytes(meta))])
        return meta

    def close(self):
        self.db.close()


# The backend classes by the name a database records (meta "backend").
BACKENDS = {"lmdb": LmdbBackend, "leveldb": LevelDbBackend}
# What a new database uses unless told otherwise (extract.py --backend).
DEFAULT_BACKEND = "lmdb"


def meta_bytes(meta):
    """The metadata record as stored: JSON with sorted keys."""
    return json.dumps(meta, sort_keys=True).encode()
