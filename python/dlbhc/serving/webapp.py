"""The HTTP face of a QueryService: the JSON API, the search page at / and the
near-duplicates page at /duplicates.

FastAPI (routing, parameter parsing, the OpenAPI description at
/api/openapi.json and /api/docs) on uvicorn; see README for why.  Every
answer to a search is the JSON of `retrieve.py --json` (a list with one
answer per query); every error is {"error": message} with its status:

    400  bad parameter, not an image, truncated, decompression bomb
    401  the server has a token and the request does not carry it
    404  unknown image id (or anything that is not one: a word, a path),
         unknown page or asset
    405  wrong method;  413  request body over the upload limit
    503  the net is not available (--no-net, or its worker failed)

The guard around the app (_Guard, plain ASGI) refuses oversized bodies
before they are read (from Content-Length, and by counting what arrives),
checks the token, and adds headers that keep browsers from sniffing types.
Files are served from memory (the pages and their assets) or re-encoded from
database images found by id: no request ever names a file.
"""
import hmac
import json
import os
import sys
import traceback
from importlib import resources

from fastapi import FastAPI, File, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection

from ..errors import UserError
from ..report import configure
from ..search.params import DEFAULT_TOP_K
from .netpool import Unavailable
from .display import to_json
from .service import BadRequest, Limits, NotFound, QueryService, limit_malloc_arenas

TOKEN_COOKIE = "dlbhc_token"
# serve.py --workers N: the settings each worker process builds its service from.
SETTINGS_ENV = "DLBHC_SERVE_SETTINGS"
# Paths anyone may fetch when the server has a token: the page and its
# assets hold no data; health says only that the server answers.
OPEN_PATHS = ("/", "/duplicates", "/favicon.ico", "/api/health")
OPEN_PREFIXES = ("/static/",)
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8",
          "common.js": "text/javascript; charset=utf-8",
          "duplicates.js": "text/javascript; charset=utf-8"}
PAGE_POLICY = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
               "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
               "frame-ancestors 'none'")
_STATUS = ((NotFound, 404), (Unavailable, 503), (BadRequest, 400), (UserError, 400))


def _error(status, message, headers=None):
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_message(exc):
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x not in ("query", "body", "path")]
        got = err.get("input")
        shown = "" if got is None or isinstance(got, (dict, list)) else f" (got {str(got)[:60]!r})"
        parts.append(f"{'.'.join(loc) or 'request'}: {err.get('msg', 'invalid')}{shown}")
    return "; ".join(parts) or "invalid request"


def _read_asset(name):
    return resources.files(__package__).joinpath("web", name).read_bytes()


def _timing_header(timings):
    return ", ".join(f"{name};dur={ms:.2f}" for name, ms in timings.items())


def create_app(service, token=None):
    """The ASGI application serving `service` (a QueryService); with a token,
    every /api/ path but /api/health needs it (Authorization: Bearer, or the
    cookie set by opening /?token=...)."""
    app = FastAPI(title="dlbhc", summary="Image retrieval with deep binary hash codes",
                  docs_url="/api/docs", redoc_url=None, openapi_url="/api/openapi.json")
    page = _read_asset("index.html")
    duplicates_page = _read_asset("duplicates.html")
    assets = {name: (_read_asset(name), kind) for name, kind in ASSETS.items()}
    limits = service.limits

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"nothing at {request.url.path[:100]!r}: see /api/docs for the API"
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc):
        return _error(400, _validation_message(exc))

    @app.exception_handler(UserError)
    async def user_error(request, exc):
        status = next(code for kind, code in _STATUS if isinstance(exc, kind))
        return _error(status, str(exc))

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        traceback.print_exception(exc, file=sys.stderr)
        return _error(500, f"internal error ({type(exc).__name__}); the server log has details")

    # ---- the page -----------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index(request: HTTPConnection):
        given = request.query_params.get("token")
        if token and given is not None:
            if not hmac.compare_digest(given.encode(), token.encode()):
                return _error(401, "wrong token")
            # Into a cookie, then out of the address bar (and its history).
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return response
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY,
                                           "Cache-Control": "no-cache"})

    @app.get("/duplicates", include_in_schema=False)
    def duplicates_index():
        return HTMLResponse(duplicates_page, headers={"Content-Security-Policy": PAGE_POLICY,
                                                      "Cache-Control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    def asset(name: str):
        if name not in assets:
            raise NotFound(f"no asset {name[:60]!r}")
        body, kind = assets[name]
        return Response(body, media_type=kind, headers={"Cache-Control": "no-cache"})

    # ---- the API --------------------------------------------------------------
    @app.get("/api/health", summary="The server answers")
    def health():
        return {"status": "ok"}

    @app.get("/api/info", summary="The database, model, index and limits")
    def info():
        return service.info()

    top_k_doc = f"results per query (1..{limits.max_top_k})"
    candidates_doc = "the coarse stage gathers at least this many images (default 2 x top_k)"
    radius_doc = "never look beyond this Hamming radius"

    @app.get("/api/search", summary="Search with database images as queries (by id)")
    def search_by_id(id: list[str] = Query(..., description="database image id; repeat for "
                                           "several queries"),
                     top_k: int = Query(DEFAULT_TOP_K, description=top_k_doc),
                     candidates: int | None = Query(None, description=candidates_doc),
                     max_radius: int | None = Query(None, description=radius_doc)):
        params = service.search_params(top_k, candidates, max_radius)
        answers = service.search_ids(id, params)
        return Response(to_json(answers, indent=None), media_type="application/json")

    @app.post("/api/search", summary="Search with uploaded images (multipart field 'image', "
                                     "repeatable)")
    async def search_by_upload(image: list[UploadFile] = File(..., description="query image(s)"),
                               top_k: int = Query(DEFAULT_TOP_K, description=top_k_doc),
                               candidates: int | None = Query(None, description=candidates_doc),
                               max_radius: int | None = Query(None, description=radius_doc)):
        # (QueryService checks the number of images.)  The parts stay where the multipart parser put them (memory up to
        # 1 MB, a temporary file beyond): each is read while it is decoded.
        params = service.search_params(top_k, candidates, max_radius)
        files = [(upload.filename, upload.file) for upload in image]
        answers, timings = await run_in_threadpool(service.search_uploads, files, params)
        return Response(to_json(answers, indent=None), media_type="application/json",
                        headers={"Server-Timing": _timing_header(timings)})

    @app.get("/api/duplicates", summary="Groups of near-identical images (duplicates.py's "
                                        "JSON)")
    def duplicates(level: str = Query("duplicates", description="duplicates (the same "
                                      "picture) or similar (looser)"),
                   radius: int | None = Query(None, description="Hamming radius (default: "
                                              "the level's)"),
                   threshold: float | None = Query(None, description="largest distance of "
                                                   "unit-length fc7 rows, 0..2 (default: the "
                                                   "level's)")):
        return service.duplicates(level, radius, threshold)

    @app.get("/api/images/{image_id}", summary="A database image's record (path, label)")
    def image_record(image_id: str):
        return service.image_record(image_id)

    @app.get("/api/images/{image_id}/thumbnail", summary="A database image as a JPEG "
                                                         "thumbnail (by id only)",
             response_class=Response)
    def thumbnail(image_id: str, size: int = Query(128, description=f"longest side, "
                                                   f"{limits.min_thumbnail}..{limits.max_thumbnail}")):
        data = service.thumbnail(image_id, size)
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})

    return _Guard(app, limits.max_upload_bytes, token)


def app_from_environment():
    """The app of one of serve.py's worker processes (--workers N): a
    QueryService of its own (index, net, caches) made from the settings
    serve.py left in the environment (JSON: QueryService's arguments, with
    limits and token)."""
    limit_malloc_arenas()
    # A process of its own (spawned): its messages on stderr, as serve.py's.
    configure()
    settings = json.loads(os.environ[SETTINGS_ENV])
    token = settings.pop("token", None)
    limits = Limits(**settings.pop("limits"))
    return create_app(QueryService(limits=limits, **settings), token=token)


class _BodyTooLarge(HTTPException):
    """Raised by the guard's receive when a body passes the limit; an
    HTTPException so that FastAPI's body parsing passes it on as it is."""

    def __init__(self, max_body):
        super().__init__(413, f"request body over the upload limit of {max_body / (1 << 20):g} "
                              "MB (serve.py --max-upload-mb)", headers={"Connection": "close"})


class _Guard:
    """Plain ASGI middleware: token check, upload size limit, safe headers."""

    def __init__(self, app, max_body, token):
        self.app, self.max_body, self.token = app, int(max_body), token

    def _authorised(self, conn):
        path = conn.url.path
        if not self.token or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return True
        given = conn.headers.get("authorization", "")
        given = given[7:] if given.lower().startswith("bearer ") else None
        given = given or conn.cookies.get(TOKEN_COOKIE)
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        conn = HTTPConnection(scope)
        if not self._authorised(conn):
            return await _error(401, "this server needs its token: send 'Authorization: Bearer "
                                     "TOKEN', or open the address serve.py printed",
                                headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        length = conn.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return await _error(400, "bad Content-Length")(scope, receive, send)
            if int(length) > self.max_body:
                return await self._too_large(scope, receive, send)

        received = 0
        started = False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _BodyTooLarge(self.max_body)
            return message

        async def guarded_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                headers += [(b"x-content-type-options", b"nosniff"),
                            (b"referrer-policy", b"no-referrer")]
                message = dict(message, headers=headers)
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except _BodyTooLarge:
            if not started:
                await self._too_large(scope, receive, send)

    async def _too_large(self, scope, receive, send):
        exc = _BodyTooLarge(self.max_body)
        await _error(413, exc.detail, headers=exc.headers)(scope, receive, send)
