"""Issue 21 (near-duplicates): all pairs within a Hamming radius, their
feature-distance filter and the groups, checked against brute force on
seeded codes; duplicates.py's outputs and its refusals of bad input."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dlbhc.search.groups import components, groups
from dlbhc.search.pairs import close_pairs, near_pairs
from dlbhc_testing.reference import brute_force_groups, brute_force_pairs
from dlbhc_testing.synthetic import clustered_codes, zipf_clustered_codes
from helpers import MEAN, ROOT, make_copied_images, make_tiny_net, run_extract, run_script


def listed(pairs, chunk=None):
    out = {}
    for i, j, d in (pairs.image_pairs() if chunk is None else pairs.image_pairs(chunk)):
        for a, b, h in zip(i.tolist(), j.tolist(), d.tolist()):
            assert a < b and (a, b) not in out
            out[(a, b)] = h
    return out


@pytest.mark.parametrize("bits,radius,seed", [(12, 2, 0), (48, 2, 1), (48, 3, 2), (64, 1, 3),
                                              (100, 2, 4), (20, 0, 5)])
def test_near_pairs_match_brute_force(bits, radius, seed):
    rng = np.random.default_rng(seed)
    codes = clustered_codes(rng, 400, bits, n_centres=5, flip_p=0.03 if bits > 20 else 0.1)
    codes[50:60] = codes[40]                       # a bucket of identical codes
    truth = {k: h for k, (h, _) in brute_force_pairs(codes, bits, radius).items()}
    assert len(truth) > 50
    for method in ("probe", "scan", "auto"):
        pairs = near_pairs(codes, bits, radius, method=method)
        assert listed(pairs) == truth
        assert pairs.count() == len(truth)
        # small chunks cut buckets and bucket pairs apart: the same pairs
        assert listed(pairs, chunk=7) == truth


def test_the_scan_takes_over_where_patterns_outnumber_codes():
    from dlbhc.search.pairs import PROBE_SHARE, pattern_count
    assert pattern_count(48, 2) == 48 + 1128 and pattern_count(48, 0) == 0
    rng = np.random.default_rng(9)
    codes = clustered_codes(rng, 500, 48, n_centres=3, flip_p=0.05)
    assert pattern_count(48, 6) > PROBE_SHARE * 500       # auto scans here
    truth = {k: h for k, (h, _) in brute_force_pairs(codes, 48, 6).items()}
    assert listed(near_pairs(codes, 48, 6)) == truth and len(truth) > 100


def test_near_pairs_of_chosen_ids_and_edge_cases():
    rng = np.random.default_rng(7)
    codes, _ = zipf_clustered_codes(300, 0, 24, rng, centres=20)
    ids = rng.choice(300, 200, replace=False)
    got = listed(near_pairs(codes, 24, 2, ids=ids))
    truth = {k: h for k, (h, _) in brute_force_pairs(codes, 24, 2, ids=ids).items()}
    assert got == truth and truth
    assert listed(near_pairs(codes[:0], 24, 2)) == {}
    assert listed(near_pairs(codes[:1], 24, 2)) == {}
    with pytest.raises(ValueError, match="radius"):
        near_pairs(codes, 24, -1)


@pytest.mark.parametrize("near,threshold,ratio,k", [(0.0, 0.9, 1.0, 0), (0.3, 0.9, 0.8, 5),
                                                    (0.0, 1.0, 0.6, 10), (0.2, 0.5, 0.9, 3)])
def test_close_pairs_and_groups_match_brute_force(near, threshold, ratio, k):
    rng = np.random.default_rng(11)
    codes = clustered_codes(rng, 300, 32, n_centres=4, flip_p=0.03)
    rows = np.abs(rng.standard_normal((300, 16))).astype(np.float32)
    rows[100:110] = rows[100] * rng.uniform(0.5, 2, (10, 1))   # same direction
    rows[200:203] = rows[200] + rng.normal(0, 0.05, (3, 16))   # close
    pairs = near_pairs(codes, 32, 2)
    i, j, d, dist = close_pairs(pairs, rows, threshold, near=near, ratio=ratio, k=k)
    truth = brute_force_pairs(codes, 32, 2, rows, threshold, near=near, ratio=ratio, k=k)
    assert 10 < len(truth) < pairs.count()
    got = {(a, b): (h, x) for a, b, h, x in zip(i.tolist(), j.tolist(), d.tolist(),
                                                dist.tolist())}
    # (float32 against float64: a pair within rounding of a bound could go
    # either way; none is, on these seeds)
    assert set(got) == set(truth)
    if k:   # the local scale decided some pairs that the threshold alone keeps
        plain = brute_force_pairs(codes, 32, 2, rows, threshold, near=near)
        assert set(truth) < set(plain)
    for key in set(got) & set(truth):
        assert got[key][0] == truth[key][0] and abs(got[key][1] - truth[key][1]) < 1e-5
    found = {tuple(g.tolist()) for g in groups(300, i, j)}
    assert found == brute_force_groups(zip(i.tolist(), j.tolist()))


def test_components_chain_and_order():
    # a long chain given in the worst order still becomes one component
    n = 1000
    i = np.arange(n - 1)[::-1]
    assert set(components(n, i, i + 1).tolist()) == {0}
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 500, 300), rng.integers(0, 500, 300)
    found = groups(500, a, b)
    assert {tuple(g.tolist()) for g in found} == brute_force_groups(zip(a.tolist(), b.tolist()))
    assert [len(g) for g in found] == sorted((len(g) for g in found), reverse=True)


# ---- duplicates.py and the API over a database ------------------------------------------

DUPLICATES = ROOT / "python" / "duplicates.py"


@pytest.fixture(scope="module")
def dup_db(caffe, tmp_path_factory):
    """A database of 30 random images, 3 of them copied byte for byte and 3
    lightly edited (every pixel +4), made by extract.py with a tiny net."""
    folder = tmp_path_factory.mktemp("dups")
    deploy, weights = make_tiny_net(caffe, folder, bits=12)
    make_copied_images(folder / "imgs", 30, copies=3, edits=3)
    db = folder / "db.lmdb"
    run_extract([folder / "imgs", "--out", db, "--deploy", deploy, "--weights", weights,
                 "--mean", MEAN, "--batch-size", 8])
    return {"db": db, "folder": folder}


def expected_groups(db, radius, threshold, level="duplicates"):
    from dlbhc.serving.duplicates import LEVELS
    from dlbhc.store.database import FeatureStore
    with FeatureStore.open(db) as store:
        codes, rows, bits = store.codes(), store.fc7(range(store.count)), store.bits
    rule = LEVELS[level]
    truth = brute_force_pairs(codes, bits, radius, rows, threshold,
                              near=min(rule.near, threshold),
                              ratio=rule.ratio, k=rule.k)
    return brute_force_groups(truth), truth


def test_cli_lists_groups_as_brute_force_and_marks_exact_copies(dup_db, tmp_path):
    out_dir = tmp_path / "out"
    run = run_script(DUPLICATES, [dup_db["db"], "--radius", 1, "--threshold", 0.05,
                                  "--out", out_dir])
    listing = json.loads((out_dir / "duplicates.json").read_text())
    groups_truth, pairs_truth = expected_groups(dup_db["db"], 1, 0.05)
    assert {tuple(g["ids"]) for g in listing["groups"]} == groups_truth
    assert listing["close_pairs"] == len(pairs_truth) and listing["radius"] == 1
    assert f"{len(groups_truth)} groups" in run.stdout
    # the three byte-for-byte copies are groups with their originals, marked exact
    copies = [g for g in listing["groups"] if g["exact_copies"]]
    named = {Path(p).name for g in copies for same in g["exact_copies"]
             for p in (g["paths"][g["ids"].index(i)] for i in same)}
    assert {f"copy{n}.png" for n in range(3)} <= named
    assert {f"img{n:04d}.png" for n in range(3)} <= named
    # the TSV holds the same groups, and each group has its contact sheet
    rows = [ln.split("\t") for ln in (out_dir / "duplicates.tsv").read_text().splitlines()]
    assert rows[0] == ["group", "size", "id", "label", "exact_copy_of", "path"]
    by_group = {}
    for row in rows[1:]:
        by_group.setdefault(int(row[0]), []).append(int(row[2]))
    assert {tuple(v) for v in by_group.values()} == groups_truth
    assert sum(1 for row in rows[1:] if row[4]) == 3
    sheets = sorted(out_dir.glob("group-*.png"))
    assert len(sheets) == len(groups_truth)
    assert Image.open(sheets[0]).size[0] > 100


def test_cli_levels_default_and_similar_find_at_least_as_much(dup_db, tmp_path):
    from dlbhc.serving.duplicates import LEVELS
    sizes = {}
    for level in ("duplicates", "similar"):
        run = run_script(DUPLICATES, [dup_db["db"], "--level", level, "--out",
                                      tmp_path / level, "--no-sheets"])
        listing = json.loads((tmp_path / level / "duplicates.json").read_text())
        assert listing["level"] == level and listing["radius"] == LEVELS[level].radius
        truth, _ = expected_groups(dup_db["db"], min(LEVELS[level].radius, 12),
                                   LEVELS[level].threshold, level)
        assert {tuple(g["ids"]) for g in listing["groups"]} == truth
        assert not list((tmp_path / level).glob("*.png")) and "groups" in run.stdout
        sizes[level] = listing["close_pairs"]
    assert sizes["similar"] >= sizes["duplicates"]


@pytest.mark.parametrize("args,words", [
    (["{missing}"], "does not exist"),
    (["{db}", "--radius", "-1"], "--radius"),
    (["{db}", "--radius", "13"], "radius must be between 0 and 12"),
    (["{db}", "--radius", "two"], "not a whole number"),
    (["{db}", "--threshold", "3"], "threshold must be between 0 and 2"),
    (["{db}", "--level", "same"], "invalid choice"),
])
def test_cli_bad_input_is_a_clear_message(dup_db, tmp_path, args, words):
    args = [a.format(db=dup_db["db"], missing=tmp_path / "nope.lmdb") for a in args]
    run = run_script(DUPLICATES, args, check=False)
    assert run.returncode == 2
    assert words in run.stderr and "Traceback" not in run.stderr


def test_api_answers_the_cli_listing_and_refuses_bad_settings(dup_db, tmp_path):
    from fastapi.testclient import TestClient
    from dlbhc.serving.service import QueryService
    from dlbhc.serving.webapp import create_app
    run_script(DUPLICATES, [dup_db["db"], "--out", tmp_path, "--no-sheets"])
    cli_listing = json.loads((tmp_path / "duplicates.json").read_text())
    service = QueryService(dup_db["db"], net=False, refresh_seconds=0)
    with TestClient(create_app(service)) as client:
        got = client.get("/api/duplicates").json()
        assert got["groups"] == cli_listing["groups"] and got["level"] == "duplicates"
        assert client.get("/api/duplicates?level=similar").json()["level"] == "similar"
        for query, words in (("level=same", "unknown level"), ("radius=99", "radius"),
                             ("threshold=-1", "threshold"), ("radius=x", "radius")):
            response = client.get(f"/api/duplicates?{query}")
            assert response.status_code == 400 and words in response.json()["error"]
        page = client.get("/duplicates")
        assert page.status_code == 200 and "duplicates.js" in page.text
        assert client.get("/static/duplicates.js").status_code == 200
    service.close()


def test_removed_images_are_never_grouped_and_ids_survive_compaction(dup_db, tmp_path):
    import shutil
    from dlbhc.serving.duplicates import find_duplicates
    from dlbhc.store.compact import compact
    from dlbhc.store.database import FeatureStore
    db = tmp_path / "db.lmdb"
    shutil.copytree(dup_db["db"], db)
    with FeatureStore.open(db) as store:
        before = find_duplicates(store, radius=1, threshold=0.05)
    grouped = sorted(i for g in before.groups for i in g.ids)
    assert len(grouped) >= 6
    gone = grouped[::2]
    with FeatureStore.open(db, readonly=False) as store:
        store.remove(gone)
    with FeatureStore.open(db) as store:
        after = find_duplicates(store, radius=1, threshold=0.05)
        assert after.images == store.count - len(gone)
    kept = {i for g in after.groups for i in g.ids}
    assert kept and not kept & set(gone)
    assert kept <= set(grouped)
    compact(db)
    with FeatureStore.open(db) as store:
        compacted = find_duplicates(store, radius=1, threshold=0.05)
        # rows moved up; the groups still name the images by their ids
        assert [g.ids for g in compacted.groups] == [g.ids for g in after.groups]
        assert [g.paths for g in compacted.groups] == [g.paths for g in after.groups]
