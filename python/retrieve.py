#!/usr/bin/env python3
"""Find the images of a feature database most similar to a query image.

    python python/retrieve.py query.jpg --db runs/cifar_hash48/db_train.lmdb
    python python/retrieve.py --id 17 --db DB --top-k 1000 --json
    python python/retrieve.py --queries list.txt --db DB --json > answers.json
    python python/retrieve.py query.jpg --db DB --montage results.png

Coarse-to-fine, as the paper: the database images in the query's code bucket
and the buckets at Hamming distance 1, 2, ... until at least --candidates
images (or --max-radius), re-ranked by the fine stage train.py chose for the
model on its held-out images (rerank.json beside the weights: fc7, latent,
pca, or none = Hamming order with the latent as tie-break). A model without
that record re-ranks by fc7, or by the PCA rows of a database with a PCA
store (python/compress.py), the best --exact-top (200) again by fc7;
--rerank fc7|latent|pca|none|hamming chooses. Answers name the classes
where the model's run folder has classes.txt (JSON keeps the numbers). The
query is prepared with the preprocessing recorded in the database, by the
net recorded there (or --deploy/--weights, which must match it).

    python python/retrieve.py query.jpg --milvus http://localhost:19530 --collection NAME

searches a database loaded into Milvus (python/index_milvus.py): the same
rule and the same answers, Milvus holding the codes and re-rank vectors.
"""
import sys
from pathlib import Path

from dlbhc import cli
from dlbhc.errors import UserError


def parse_args(argv):
    p = cli.ArgumentParser(__doc__)
    p.add_argument("query", nargs="*", help="query image file(s)")
    p.add_argument("--db", help="feature database made by extract.py")
    p.add_argument("--milvus", metavar="URI",
                   help="search a database loaded into Milvus (python/index_milvus.py) at "
                        "this server, e.g. http://localhost:19530, instead of --db")
    p.add_argument("--collection", help="the Milvus collection (with --milvus)")
    p.add_argument("--id", type=int, action="append", default=[],
                   help="use the database's own image ID as the query (repeatable); "
                        "the image itself is left out of its results")
    p.add_argument("--queries", help="list file of query images (`path [label]` lines)")
    p.add_argument("--root", help="folder that relative paths in --queries start from")
    p.add_argument("--show", type=cli.non_negative_int, default=10,
                   help="rows printed per query (table)")
    cli.add_search_arguments(p, top_k_help="results per query, up to 1000+")
    cli.add_rerank_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--montage", metavar="PNG", help="write a picture of the results "
                   "(the first query's; with several queries, one PNG each: NAME_0.png ...)")
    p.add_argument("--deploy", help="deploy prototxt (default: the one the database records)")
    p.add_argument("--weights", help="weights (default: the ones the database records)")
    cli.add_gpu_argument(p)
    args = p.parse_args(argv)
    if bool(args.db) == bool(args.milvus):
        p.error("give the database: --db DB, or --milvus URI --collection NAME")
    if args.milvus and not args.collection:
        p.error("--milvus needs --collection NAME (as given to index_milvus.py)")
    if not (args.query or args.id or args.queries):
        p.error("give a query image, --id N or --queries LIST")
    args.search = cli.search_params(p, args)
    return args


def montage_paths(base, n):
    base = Path(base)
    if n == 1:
        return [base]
    return [base.with_name(f"{base.stem}_{i}{base.suffix or '.png'}") for i in range(n)]


# Query images whose features are computed (and searched) together.
IMAGE_BATCH = 50


def main(argv=None):
    args = parse_args(argv)
    from dlbhc.images import list_images
    from dlbhc.serving.display import format_table, montage, to_json
    from dlbhc.serving.retrieval import Query, Retriever
    if args.milvus:
        if args.rerank not in ("auto", "fc7") or args.exact_top is not None:
            raise UserError(f"--rerank {args.rerank} / --exact-top work on a local database; a Milvus "
                            "collection re-ranks by the vectors index_milvus.py loaded")
        retriever = Retriever.on_milvus(args.milvus, args.collection)
    else:
        retriever = Retriever(args.db, rerank=args.rerank, exact_top=args.exact_top)
    try:
        image_queries = [Query(str(q)) for q in args.query]
        if args.queries:
            items = list_images(args.queries, root=args.root).items
            image_queries += [Query(str(it.path), label=int(it.label)) for it in items]
        answers = []
        if args.id:
            id_queries, codes, fc7 = retriever.id_queries(args.id)
            answers += retriever.search(id_queries, codes, fc7, args.search)
        if image_queries:
            for q in image_queries:
                if not Path(q.name).is_file():
                    raise UserError(f"query image {q.name} does not exist")
            retriever.load_model(args.deploy, args.weights, gpu=args.gpu)
            for start in range(0, len(image_queries), IMAGE_BATCH):
                chunk = image_queries[start:start + IMAGE_BATCH]
                fc7, codes, latent = retriever.features_of_images([q.name for q in chunk])
                answers += retriever.search(chunk, codes, fc7, args.search, latent=latent)
        if args.json:
            print(to_json(answers))
        else:
            print("\n\n".join(format_table(a, args.show) for a in answers))
        if args.montage:
            for answer, path in zip(answers, montage_paths(args.montage, len(answers))):
                montage(answer, path, shown=min(args.show, args.top_k))
                print(f"montage: {path}", file=sys.stderr)
    finally:
        retriever.close()
    return 0


if __name__ == "__main__":
    cli.run(main)
