"""Serving: a feature database answering queries, from the command line or
over HTTP.

Modules, from one query up to the web server:

    retrieval  a database opened for search (Retriever: the cached index,
               the query's features, coarse-to-fine search as a
               search.params.SearchParams asks); retrieve.py and evaluate.py
               use it directly
    display    how answers are shown: the table, the JSON (retrieve.py
               --json and the API), the montage and the one contact-sheet
               writer
    netpool    the net kept loaded for a server's concurrent requests,
               batched on one net in a thread or on nets in worker processes
    service    QueryService, the server without HTTP: the database followed
               as it grows, uploads decoded within limits, thumbnails, the
               request errors (BadRequest, NotFound; netpool.Unavailable)
    duplicates near-duplicate groups of a database at a named level
               ("duplicates", "similar"): pairs on the codes, an fc7
               threshold, exact copies by digest; JSON, TSV, contact sheets
    webapp     the HTTP API, the search page and the near-duplicates page
               over a QueryService (FastAPI)
    web/       the pages' HTML, JavaScript and CSS

The engines stay behind their imports: this package never imports FastAPI
(only `dlbhc.serving.webapp` does, imported by serve.py) and reaches Milvus
only through dlbhc.scale when Retriever.on_milvus is called; Caffe is
imported only where a net is built.  The names below are the room's public
surface.
"""
from .duplicates import LEVELS, Duplicates, Level, find_duplicates, write_listing
from .netpool import NetPool, Unavailable
from .display import contact_sheet, format_table, montage, to_json
from .retrieval import (FINE_STAGES, Answer, Hit, Query, Retriever, index_cache_path,
                        load_matching_model)
from .service import BadRequest, Limits, NotFound, QueryService

__all__ = [
    "FINE_STAGES", "LEVELS",
    "Answer", "BadRequest", "Duplicates", "Hit", "Level", "Limits", "NetPool", "NotFound",
    "Query", "QueryService", "Retriever", "Unavailable",
    "contact_sheet", "find_duplicates", "format_table", "index_cache_path",
    "load_matching_model", "montage", "to_json", "write_listing",
]
