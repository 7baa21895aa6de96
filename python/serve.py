#!/usr/bin/env python3
"""Serve a feature database: a JSON API and a search page, the net and the
index loaded once.

    python python/serve.py --db runs/demo/cifar_hash48/db_train.lmdb
    python python/serve.py --db DB --port 8080 --token "$(openssl rand -hex 16)"
    python python/serve.py --db DB --no-net          # search by id only

Open the printed address in a browser; the API is described in README.md
and at /api/docs.  Searches run on the database as extract.py leaves it:
images appended while the server runs are taken in (index rebuilt in the
background) without a restart.
"""
import json
import os
import socket

from dlbhc import cli
from dlbhc.errors import UserError

TOKEN_ENV = "DLBHC_TOKEN"


def parse_args(argv):
    from dlbhc.serving.service import Limits
    limits = Limits()
    p = cli.ArgumentParser(__doc__)
    p.add_argument("--db", required=True, help="feature database made by extract.py")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default %(default)s; 0: any free)")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                   help=f"require this token on the API (default: ${TOKEN_ENV}); clients send "
                        "'Authorization: Bearer TOKEN', browsers open the printed address")
    p.add_argument("--no-net", action="store_true",
                   help="do not load the net: search by database id only")
    p.add_argument("--deploy", help="deploy prototxt (default: the one the database records)")
    p.add_argument("--weights", help="weights (default: the ones the database records)")
    cli.add_gpu_argument(p)
    p.add_argument("--workers", type=cli.positive_int, default=1, metavar="N",
                   help="N server processes on the one port, each with its own index and net "
                        "(default 1; see README for measurements)")
    p.add_argument("--net-processes", type=cli.non_negative_int, default=0, metavar="N",
                   help="run N nets in worker processes (default 0: one net in a thread of "
                        "the server; see README for the measured difference)")
    p.add_argument("--max-batch", type=cli.positive_int, default=32,
                   help="query images run through the net together (default %(default)s)")
    p.add_argument("--blas-threads", type=cli.positive_int,
                   help="OpenBLAS threads per net (default 1: measured fastest for query "
                        "batches on a shared machine; see README)")
    p.add_argument("--refresh-seconds", type=float, default=2.0,
                   help="how often to look for images appended to the database "
                        "(default %(default)s; 0: never)")
    p.add_argument("--max-upload-mb", type=float, default=limits.max_upload_bytes / (1 << 20),
                   help="largest request body (default %(default)g MB)")
    p.add_argument("--max-pixels", type=cli.positive_int, default=limits.max_pixels,
                   help="largest uploaded image, width x height (default %(default)d)")
    p.add_argument("--max-images", type=cli.positive_int, default=limits.max_images,
                   help="query images or ids in one request (default %(default)d)")
    p.add_argument("--max-top-k", type=cli.positive_int, default=limits.max_top_k,
                   help="largest top_k a request may ask (default %(default)d)")
    p.add_argument("--max-connections", type=cli.positive_int, default=64,
                   help="connections served at once; more get 503 (default %(default)d)")
    p.add_argument("--access-log", action="store_true", help="log every request")
    cli.add_rerank_arguments(p)
    args = p.parse_args(argv)
    if args.max_upload_mb <= 0:
        p.error("--max-upload-mb must be positive")
    if not 0 <= args.port <= 65535:
        p.error("--port must be in 0..65535")
    return args


def bind(host, port):
    """A listening socket, bound before the slow start-up so that a port in
    use is reported at once (connections wait in the backlog until ready)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        raise UserError(f"--host {host}: {err.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror} "
                        "(another server there? pass --port N)") from None
    sock.listen(2048)
    return sock


def is_loopback(host):
    return host in ("localhost", "::1") or host.startswith("127.")


def main(argv=None):
    args = parse_args(argv)
    import uvicorn
    from uvicorn.supervisors import Multiprocess
    from dlbhc.serving.service import Limits, QueryService, limit_malloc_arenas
    from dlbhc.serving.webapp import SETTINGS_ENV, create_app

    limits = Limits(max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
                    max_pixels=args.max_pixels, max_images=args.max_images,
                    max_top_k=args.max_top_k)
    settings = dict(db_path=str(args.db), net=not args.no_net, deploy=args.deploy,
                    weights=args.weights, gpu=args.gpu, net_processes=args.net_processes,
                    max_batch=args.max_batch, blas_threads=args.blas_threads,
                    refresh_seconds=args.refresh_seconds, rerank=args.rerank,
                    exact_top=args.exact_top)
    limit_malloc_arenas()
    sock = bind(args.host, args.port)
    # Everything is loaded and checked here first (with --workers, each
    # worker then loads its own copy, from the index cached by this one).
    service = QueryService(limits=limits, **settings)
    try:
        host, port = sock.getsockname()[:2]
        shown_host = f"[{host}]" if ":" in host else host
        url = f"http://{shown_host}:{port}/"
        info = service.info()
        model = info["model"]
        print(f"dlbhc serve: {info['database']}: {info['count']:,} images, {info['bits']} bits, "
              f"fc7 {info['fc7_dim']}", flush=True)
        print(f"  model: {model['deploy']} + {model['weights']}"
              + ("" if service.net else " (not loaded: --no-net, search by id only)"), flush=True)
        if service.net:
            print(f"  net: {service.net.mode}, batches of up to {service.net.max_batch}"
                  + (f", in each of {args.workers} workers" if args.workers > 1 else ""),
                  flush=True)
        if not is_loopback(host) and not args.token:
            print(f"  warning: listening on {host} without a token: anyone who can reach this "
                  f"machine can query it (set --token or ${TOKEN_ENV})", flush=True)
        print(f"  API: {url}api/ (described at {url}api/docs)", flush=True)
        options = dict(log_level="warning", access_log=args.access_log, server_header=False,
                       limit_concurrency=args.max_connections, timeout_keep_alive=5)
        if args.workers == 1:
            print(f"serving {url}" + (f"?token={args.token}" if args.token else ""), flush=True)
            uvicorn.Server(uvicorn.Config(create_app(service, token=args.token),
                                          **options)).run(sockets=[sock])
        else:
            service.close()
            service = None
            os.environ[SETTINGS_ENV] = json.dumps(dict(settings, limits=limits.as_dict(),
                                                       token=args.token))
            config = uvicorn.Config("dlbhc.serving.webapp:app_from_environment", factory=True,
                                    workers=args.workers, **options)
            print(f"serving {url}" + (f"?token={args.token}" if args.token else "")
                  + f" ({args.workers} worker processes)", flush=True)
            Multiprocess(config, sockets=[sock]).run()
    finally:
        sock.close()
        if service is not None:
            service.close()
    return 0


if __name__ == "__main__":
    cli.run(main)
