#!/usr/bin/env python3
"""Load a feature database into Milvus, for collections past one machine.

    python python/index_milvus.py db/my_collection.lmdb --uri http://localhost:19530
    python python/retrieve.py query.jpg --milvus http://localhost:19530 --collection my_collection

Puts the binary codes (BINARY_VECTOR, HAMMING metric; BIN_FLAT exact, or
BIN_IVF_FLAT), the re-rank vectors, the image ids, paths and labels into
two collections, NAME and NAME_rerank, and the database's metadata (model,
preprocessing) into NAME's properties, so retrieve.py --milvus needs only
the server.  Rerun after an interruption, or after extract.py appended
images: it loads what is missing.  With BIN_FLAT (the default), or
BIN_IVF_FLAT searched with --nprobe equal to --nlist, searches return what
the local index returns.
"""
from dlbhc import cli


def parse_args(argv):
    p = cli.ArgumentParser(__doc__)
    p.add_argument("db", help="feature database made by extract.py")
    p.add_argument("--uri", required=True, help="Milvus server, e.g. http://localhost:19530")
    p.add_argument("--collection", help="collection name (default: from the database's "
                                        "folder name)")
    p.add_argument("--index", choices=["BIN_FLAT", "BIN_IVF_FLAT"], default="BIN_FLAT",
                   help="Milvus index of the codes (default BIN_FLAT: exact)")
    p.add_argument("--nlist", type=cli.positive_int, default=1024, help="BIN_IVF_FLAT clusters")
    p.add_argument("--nprobe", type=cli.positive_int, help="BIN_IVF_FLAT clusters searched (default: "
                                              "--nlist, i.e. exact)")
    p.add_argument("--replace", action="store_true",
                   help="drop a collection of that name holding another database")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from dlbhc.errors import UserError
    from dlbhc.scale.milvus_index import collection_name, load_database
    from dlbhc.progress import Progress
    from dlbhc.store.database import FeatureStore
    name = args.collection or collection_name(args.db)
    with FeatureStore.open(args.db) as store:
        if store.count == 0:
            raise UserError(f"{args.db} holds no images yet: run extract.py first")
        progress = Progress(store.live_count, label="milvus load", unit="img")
        loaded = load_database(store, args.uri, name, index_type=args.index, nlist=args.nlist,
                               nprobe=args.nprobe, replace=args.replace, progress=progress)
        progress.close()
        print(f"{args.uri} collection {name}: {store.live_count} images ({loaded} loaded now), "
              f"{args.index}, codes {store.bits} bits, re-rank vectors {store.fc7_dim}")
    print(f"search it: python python/retrieve.py QUERY --milvus {args.uri} --collection {name}")
    return 0


if __name__ == "__main__":
    cli.run(main)
