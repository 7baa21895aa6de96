#!/usr/bin/env python3
"""Retrieval quality of the compressed (PCA) re-rank store: mAP@k of the
coarse-to-fine search re-ranked by exact fc7 against PCA-d, plain and
whitened, with and without the two-step fine stage (PCA, then exact fc7 on
the best --exact-top).

    .venv/bin/python benchmarks/bench_pca_map.py                 # the make demo databases
    .venv/bin/python benchmarks/bench_pca_map.py --database runs/cifar_hash48/db_train.lmdb \\
        --queries runs/cifar_hash48/db_test.lmdb --dims 32,64,128,256 --exact-top 0,200

Everything runs through the scripts users run: the database is copied into
--workdir (compress.py writes its PCA store into the database folder; the
original is not touched), then for every setting `python/compress.py COPY
--pca D [--whiten] --replace` and `python/evaluate.py --database COPY
--queries Q --rerank pca --exact-top E`, and once `--rerank fc7` as the
baseline.  The PCA is learned on the database's own fc7 (all of it when it
holds fewer than compress.py's --sample rows, e.g. CIFAR-10's 50,000).
Prints a table (mAP@k, its difference to fc7, P@k, mAP over the whole
ranking, variance kept) and writes --json.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dlbhc.errors import UserError, run_main

ROOT = Path(__file__).resolve().parents[1]


DEMO = ROOT / "runs" / "demo" / "cifar_hash48"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database", default=str(DEMO / "db_train.lmdb"))
    p.add_argument("--queries", default=str(DEMO / "db_test.lmdb"))
    p.add_argument("--dims", default="32,64,128,256", help="PCA sizes (default %(default)s)")
    p.add_argument("--whiten", default="no,yes", help="plain and/or whitened (default %(default)s)")
    p.add_argument("--exact-top", default="0,200",
                   help="two-step sizes, 0 = PCA ranking only (default %(default)s)")
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--workdir", help="where the database copy goes (default: a temp folder, "
                                     "deleted at the end)")
    p.add_argument("--json", default="out/bench_pca_map.json")
    args = p.parse_args(argv)
    try:
        args.dims = [int(d) for d in args.dims.split(",")]
        args.exact_top = [int(e) for e in args.exact_top.split(",")]
    except ValueError:
        raise UserError("--dims and --exact-top take comma-separated integers") from None
    args.whiten = [w.strip() == "yes" for w in args.whiten.split(",")]
    for path in (args.database, args.queries):
        if not Path(path).is_dir():
            raise UserError(f"{path} is not a feature database: run `make demo` (or pass "
                            "--database/--queries)")
    return args


def run(script, *args):
    cmd = [sys.executable, str(ROOT / "python" / script), *map(str, args)]
    start = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise UserError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return out.stdout, time.monotonic() - start


def evaluate(db, queries, k, out_dir, rerank, exact_top=0):
    _, seconds = run("evaluate.py", "--database", db, "--queries", queries, "--k", k,
                     "--rerank", rerank, "--exact-top", exact_top, "--out-dir", out_dir)
    figures = json.loads((out_dir / "figures.json").read_text())
    fine = figures["fine"]
    return {"rerank": fine["rerank"], "map_at_k": fine["map_at_k"], "map": fine["map"],
            "precision_at_k": fine["precision_at_k"], "candidates_mean": fine["candidates_mean"],
            "coarse_map_at_k": figures["coarse"]["map_at_k"], "evaluate_s": seconds}


def main(argv=None):
    args = parse_args(argv)
    own = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="bench_pca_map_") if own else args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"{os.cpu_count()} cores", flush=True)
    rows = []
    try:
        db = work / "database.lmdb"
        if db.exists():
            shutil.rmtree(db)
        shutil.copytree(args.database, db)
        queries = work / "queries.lmdb"
        if queries.exists():
            shutil.rmtree(queries)
        shutil.copytree(args.queries, queries)
        base = evaluate(db, queries, args.k, work / "eval_fc7", "fc7")
        base.update(setting="fc7", dim=None, whiten=None, exact_top=None, explained=None)
        rows.append(base)
        print(format_row(base, base), flush=True)
        for dim in args.dims:
            for whiten in args.whiten:
                stdout, compress_s = run("compress.py", db, "--pca", dim, "--replace",
                                         *(["--whiten"] if whiten else []))
                info = json.loads(run("compress.py", db, "--info")[0].split("\n", 1)[1])
                for exact_top in args.exact_top:
                    row = evaluate(db, queries, args.k, work / f"eval_pca{dim}{whiten}{exact_top}",
                                   "pca", exact_top)
                    row.update(setting=row["rerank"], dim=dim, whiten=whiten,
                               exact_top=exact_top, explained=info["explained"],
                               compress_s=compress_s)
                    rows.append(row)
                    print(format_row(row, base), flush=True)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(header())
    for row in rows:
        print(format_row(row, base))
    end = os.getloadavg()
    print(f"load average at end {end[0]:.2f} {end[1]:.2f} {end[2]:.2f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items()},
                               "load_start": load, "load_end": end, "results": rows}, indent=2))
    print(f"results written to {out}")
    return 0


def header():
    return (f"{'fine stage':<24} {'mAP@k':>7} {'vs fc7':>8} {'P@k':>7} {'mAP':>7} "
            f"{'var kept':>8} {'eval s':>6}")


def format_row(row, base):
    kept = f"{100 * row['explained']:7.1f}%" if row.get("explained") is not None else f"{'':>8}"
    return (f"{row['setting']:<24} {row['map_at_k']:7.4f} {row['map_at_k'] - base['map_at_k']:+8.4f} "
            f"{row['precision_at_k']:7.4f} {row['map']:7.4f} {kept} {row['evaluate_s']:6.0f}")


if __name__ == "__main__":
    sys.exit(run_main(main))
