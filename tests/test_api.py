"""The JSON API in process: FastAPI's TestClient calls the app that
webapp.create_app builds over a QueryService (no server process, no
sockets), so its answers and every error code are checked in milliseconds.
serve.py run for real is tests/test_serve.py's; the page in a browser,
tests/test_browser.py's.

Two apps: one over a synthetic database without a net (no Caffe: searches
by id, parameter checks, the token, the upload limit, the error shape), and
one over the session's tiny database with its net (uploads, thumbnails).
"""
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from dlbhc.serving.service import Limits, QueryService
from dlbhc.serving.webapp import create_app
from dlbhc_testing.reference import brute_force_search
from dlbhc_testing.synthetic import clustered_codes, fc7_pool, open_or_write_store
from helpers import BAD_PARAMETERS, bomb_png, truncated_jpeg

TOKEN = "api-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
N, BITS, FC7_DIM = 40, 16, 8       # 40 images, as BAD_PARAMETERS expects
MAX_UPLOAD = 64 << 10


@pytest.fixture(scope="module")
def synthetic_db(tmp_path_factory):
    """A feature database of N clustered 16-bit codes with fc7 rows (no
    images, no preprocessing: searched by id only); {db, codes, fc7}."""
    rng = np.random.default_rng(0)
    codes, pool = clustered_codes(rng, N, BITS), fc7_pool(FC7_DIM, rng)
    store, _ = open_or_write_store(tmp_path_factory.mktemp("api") / "db.lmdb", N, FC7_DIM, BITS,
                                   codes, pool)
    store.close()
    return {"db": store.path, "codes": codes, "fc7": pool[:N]}


@pytest.fixture(scope="module")
def client(synthetic_db):
    """The app over the synthetic database: no net, a token, a 64 kB upload limit."""
    service = QueryService(synthetic_db["db"], net=False, refresh_seconds=0,
                           limits=Limits(max_upload_bytes=MAX_UPLOAD))
    with TestClient(create_app(service, token=TOKEN)) as client:
        yield client
    service.close()


@pytest.fixture(scope="module")
def net_client(database):
    """The app over the session's tiny database with its net, no token, a
    1 MB upload limit."""
    service = QueryService(database["db"], refresh_seconds=0,
                           limits=Limits(max_upload_bytes=1 << 20))
    with TestClient(create_app(service)) as client:
        yield client
    service.close()


def error_of(response, status):
    """The message of a JSON error answer, checked to be {"error": text}
    with `status`, and free of tracebacks."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in body["error"]
    return body["error"]


# ---- what it answers -----------------------------------------------------------------

def test_health_needs_no_token_and_info_describes_the_database(client):
    assert client.get("/api/health").json() == {"status": "ok"}
    info = client.get("/api/info", headers=AUTH).json()
    assert (info["count"], info["stored"], info["bits"], info["fc7_dim"]) == (N, N, BITS, FC7_DIM)
    assert info["net"] is None
    assert info["limits"]["max_upload_bytes"] == MAX_UPLOAD


def test_search_by_id_equals_brute_force_without_the_query_itself(client, synthetic_db):
    codes, fc7 = synthetic_db["codes"], synthetic_db["fc7"]
    for query_id, top_k in ((0, 5), (17, N - 1)):
        answer = client.get(f"/api/search?id={query_id}&top_k={top_k}&candidates={10 * N}",
                            headers=AUTH).json()
        assert len(answer) == 1
        results = answer[0]["results"]
        truth = brute_force_search(codes, fc7, codes[query_id], fc7[query_id], k=N)[0]
        expected = [int(i) for i in truth.ids if int(i) != query_id][:top_k]
        assert [hit["id"] for hit in results] == expected
        hamming = dict(zip(truth.ids.tolist(), truth.hamming.tolist()))
        assert [hit["hamming"] for hit in results] == [hamming[i] for i in expected]
        assert [hit["rank"] for hit in results] == list(range(1, top_k + 1))


def test_several_ids_answer_in_order_as_each_alone(client):
    together = client.get("/api/search?id=3&id=30&id=11&top_k=4", headers=AUTH).json()
    assert [a["query"] for a in together] == ["id 3: ", "id 30: ", "id 11: "]
    for query_id, answer in zip((3, 30, 11), together):
        alone = client.get(f"/api/search?id={query_id}&top_k=4", headers=AUTH).json()[0]
        assert answer["results"] == alone["results"]


def test_a_radius_limits_the_hamming_distance(client):
    results = client.get("/api/search?id=2&top_k=40&max_radius=2", headers=AUTH).json()[0][
        "results"]
    assert results and max(hit["hamming"] for hit in results) <= 2


def test_image_records_by_id(client):
    assert client.get("/api/images/7", headers=AUTH).json() == {"id": 7, "path": "",
                                                                 "label": -1, "class_name": None}


def test_the_openapi_description_lists_the_api(client):
    paths = client.get("/api/openapi.json", headers=AUTH).json()["paths"]
    assert {"/api/search", "/api/info", "/api/health", "/api/images/{image_id}"} <= set(paths)


# ---- errors: status and JSON shape ---------------------------------------------------------

# beyond helpers.BAD_PARAMETERS (which test_serve also sends over HTTP)
MORE_BAD_REQUESTS = [
    ("/api/images/99", 404, "no image"),
    ("/static/webapp.py", 404, "no asset"),
    ("/api/nothing-here", 404, "nothing at"),
]


@pytest.mark.parametrize("path,status,says", BAD_PARAMETERS + MORE_BAD_REQUESTS)
def test_bad_requests_get_their_status_and_a_json_error(client, path, status, says):
    response = client.get(path, headers=AUTH)
    assert says in error_of(response, status)
    assert "root:" not in response.text          # never /etc/passwd's contents


def test_the_token_is_needed_but_for_health_and_the_page(client):
    for path in ("/api/info", "/api/search?id=1", "/api/images/1"):
        response = client.get(path)
        assert "token" in error_of(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"
        error_of(client.get(path, headers={"Authorization": "Bearer wrong"}), 401)
    assert client.get("/api/health").status_code == 200
    assert client.get("/").status_code == 200
    assert "wrong token" in error_of(client.get("/?token=wrong"), 401)
    opened = client.get(f"/?token={TOKEN}", follow_redirects=False)
    assert opened.status_code == 303 and opened.headers["location"] == "/"
    cookie = opened.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    name, _, value = cookie.split(";")[0].partition("=")
    client.cookies.clear()
    assert TestClient(client.app, cookies={name: value}).get("/api/info").status_code == 200


def test_a_wrong_method_is_405(client):
    error_of(client.delete("/api/info", headers=AUTH), 405)


def test_a_body_over_the_upload_limit_is_413_whether_announced_or_not(client):
    big = [("image", ("big.png", b"\xff" * (MAX_UPLOAD + 1)))]
    assert "upload limit" in error_of(client.post("/api/search", files=big, headers=AUTH), 413)
    # no Content-Length: the guard counts what arrives
    chunks = iter([b"--x\r\n", b"\xff" * MAX_UPLOAD, b"\xff" * 1024])
    streamed = client.post("/api/search", content=chunks,
                           headers=dict(AUTH, **{"Content-Type": "multipart/form-data; boundary=x"}))
    assert "upload limit" in error_of(streamed, 413)


def test_uploads_without_a_net_are_503(client):
    response = client.post("/api/search", files=[("image", ("q.png", b"x"))], headers=AUTH)
    assert "by database id only" in error_of(response, 503)


# ---- with the net: uploads and thumbnails ---------------------------------------------------

def image_bytes(client, image_id):
    """The file of a database image, found through the API's record (the
    service holds the database open: LMDB allows one opening a process)."""
    with open(client.get(f"/api/images/{image_id}").json()["path"], "rb") as f:
        return f.read()


def test_an_uploaded_database_image_finds_itself_first(net_client):
    response = net_client.post("/api/search?top_k=6",
                               files=[("image", ("q.png", image_bytes(net_client, 5)))])
    assert response.status_code == 200, response.text
    answer = response.json()[0]
    assert answer["query"] == "q.png"
    top = answer["results"][0]
    assert top["id"] == 5 and top["hamming"] == 0 and top["l2"] < 1e-3
    timings = dict(item.split(";dur=") for item in response.headers["server-timing"].split(", "))
    assert set(timings) == {"decode", "net", "search"}


def test_several_uploads_answer_in_order(net_client):
    files = [("image", (f"q{i}.png", image_bytes(net_client, i))) for i in (3, 30, 11)]
    answers = net_client.post("/api/search?top_k=2", files=files).json()
    assert [a["query"] for a in answers] == ["q3.png", "q30.png", "q11.png"]
    assert [a["results"][0]["id"] for a in answers] == [3, 30, 11]


HOSTILE_UPLOADS = [
    ("not an image", lambda: b"hello " * 50, 400, "not an image"),
    ("truncated", truncated_jpeg, 400, "truncated"),
    ("bomb", bomb_png, 400, "decompression-bomb"),
    ("empty", lambda: b"", 400, "empty"),
]


@pytest.mark.parametrize("name,make,status,says", HOSTILE_UPLOADS,
                         ids=[case[0] for case in HOSTILE_UPLOADS])
def test_bad_uploads_are_refused_with_the_reason(net_client, name, make, status, says):
    response = net_client.post("/api/search", files=[("image", ("x.jpg", make()))])
    assert says in error_of(response, status)


def test_uploads_need_an_image_field_and_at_most_the_limit(net_client):
    response = net_client.post("/api/search", content=b"--x--\r\n",
                               headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert "image" in error_of(response, 400)
    data = image_bytes(net_client, 0)
    max_images = net_client.get("/api/info").json()["limits"]["max_images"]
    files = [("image", (f"q{i}.png", data)) for i in range(max_images + 1)]
    assert f"at most {max_images}" in error_of(net_client.post("/api/search", files=files), 400)


def test_thumbnails_are_jpegs_that_fit_the_size(net_client):
    response = net_client.get("/api/images/7/thumbnail?size=16")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(response.content)) as img:
        assert img.format == "JPEG" and img.size == (16, 12)     # 40x30 shrunk to fit 16x16
    with Image.open(io.BytesIO(net_client.get("/api/images/7/thumbnail").content)) as img:
        assert img.size == (40, 30)                               # never enlarged
    assert "size" in error_of(net_client.get("/api/images/7/thumbnail?size=100000"), 400)


def test_info_names_the_model_and_the_net(net_client, database):
    info = json.loads(net_client.get("/api/info").text)
    assert info["model"]["weights"] == str(database["weights"])
    assert info["net"]["mode"] and info["net"]["max_batch"] == 32
