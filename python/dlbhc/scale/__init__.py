"""scale: the same jobs on engines built for many machines, as thin
adapters over the single-machine code (the database format, the search
rule and the ranking stay theirs).  The engines (ray, pymilvus) are
imported only when a job runs or a server is contacted, never by importing
this room: the single-machine path works without them installed.

    ray_extract   extract.py --ray: the collection cut into shards,
                  extracted on Ray actors that each hold one copy of the
                  net (extraction.NetCopy), merged into the database in
                  input order; resumable after any crash
    milvus_index  a feature database loaded into Milvus collections, and
                  the coarse-to-fine search with Milvus as coarse stage and
                  re-rank vector store (index_milvus.py, retrieve.py
                  --milvus)

Public surface: extract_on_ray, load_database, collection_name,
MilvusCollection, MilvusIndex.
"""
from .milvus_index import MilvusCollection, MilvusIndex, collection_name, load_database
from .ray_extract import extract_on_ray

__all__ = ["MilvusCollection", "MilvusIndex", "collection_name", "extract_on_ray",
           "load_database"]
