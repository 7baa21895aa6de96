"""The fine stage chosen per model and class names in answers (issue 20,
parts 1 and 4).

The new stages (latent, asymmetric = the query's latent against the code
bits, none = Hamming order with latent tie-break, hamming)
against the brute-force reference; the choice rule (never below coarse) on
seeded data where fc7 is made bad; --rerank auto reading the model's record
in the Retriever, evaluate.py and the service; and, end to end, train.py
writing the record that retrieve.py, evaluate.py and the service then use,
with class names in the text, JSON and API answers.
"""
import json
import os

import numpy as np
import pytest

from dlbhc.errors import UserError
from dlbhc.nets.records import read_rerank_record, write_rerank_record
from dlbhc.search.choice import (CANDIDATES, MIN_CHOICE_QUERIES, STAGES, UNMEASURED_STAGE, choose,
                                 measure_fine_stages, sampled_top_k, stage_rows)
from dlbhc.search.codes import pack_codes
from dlbhc.search.index import HashIndex
from dlbhc.search.metrics import evaluate
from dlbhc.search.params import SearchParams
from dlbhc.serving.display import format_table, montage, to_json
from dlbhc.serving.retrieval import Query, Retriever
from dlbhc.serving.service import QueryService
from dlbhc.store.database import FeatureStore
from dlbhc_testing.reference import brute_force_search
from helpers import ROOT, TRAIN, run_script

EVALUATE = ROOT / "python" / "evaluate.py"
RETRIEVE = ROOT / "python" / "retrieve.py"
BITS = 16


def labelled_features(rng, n, classes=4, fc7_good=True, bits=BITS, dim=24, noise=0.35):
    """Seeded features of n images in `classes` classes: latent = the
    class's centre pulled by noise (codes: latent > 0.5), fc7 either
    informative (class one-hot + noise) or made bad (noise alone)."""
    labels = rng.integers(0, classes, n)
    centres = rng.random((classes, bits))
    latent = np.clip(centres[labels] + noise * rng.standard_normal((n, bits)), 0, 1)
    latent = latent.astype(np.float32)
    fc7 = rng.standard_normal((n, dim)).astype(np.float32)
    if fc7_good:
        fc7[np.arange(n), labels] += 6.0
    return labels, latent, fc7, pack_codes(latent)


# ---- the stages, against brute force ------------------------------------------------

@pytest.mark.parametrize("stage", ["latent", "none", "hamming"])
def test_new_stages_rank_as_the_brute_force_reference(stage):
    rng = np.random.default_rng(3)
    _, latent, fc7, codes = labelled_features(rng, 400)
    # ties: repeated latent rows and codes
    latent[200:260] = latent[100:160]
    codes = pack_codes(latent)
    _, q_latent, q_fc7, q_codes = labelled_features(np.random.default_rng(4), 12)
    index = HashIndex.build(codes, BITS)
    reduced = stage_rows(stage, latent=latent)
    got = index.search(q_codes, q_fc7, fc7, 30, min_candidates=10 ** 6, reduced=reduced,
                       query_reduced=q_latent)
    want = brute_force_search(codes, fc7, q_codes, q_fc7, 30, bits=BITS,
                              reduced_rows=None if stage == "hamming" else latent,
                              query_reduced=q_latent, hamming_first=stage != "latent")
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.hamming, want.hamming)
    np.testing.assert_allclose(got.l2, want.l2, rtol=1e-6)
    assert (got.exact == 0).all()
    if stage != "latent":   # Hamming order first
        assert (np.diff(got.hamming, axis=1) >= 0).all()


@pytest.mark.parametrize("as_function", [False, True])
def test_the_asymmetric_stage_ranks_the_query_latent_against_the_code_bits(as_function):
    """The database side is the packed codes themselves, unpacked here by
    numpy (not through the stage's own thresholding); the latent rows come as
    an array or, as from the store, as a function ids -> rows."""
    rng = np.random.default_rng(5)
    _, latent, fc7, codes = labelled_features(rng, 400)
    latent[200:260] = latent[100:160]
    codes = pack_codes(latent)
    _, q_latent, q_fc7, q_codes = labelled_features(np.random.default_rng(6), 12)
    bit_rows = np.unpackbits(codes, axis=1)[:, :BITS].astype(np.float32)
    index = HashIndex.build(codes, BITS)
    rows = (lambda ids: latent[ids]) if as_function else latent
    got = index.search(q_codes, q_fc7, fc7, 30, min_candidates=10 ** 6,
                       reduced=stage_rows("asymmetric", latent=rows), query_reduced=q_latent)
    want = brute_force_search(codes, fc7, q_codes, q_fc7, 30, bits=BITS, reduced_rows=bit_rows,
                              query_reduced=q_latent)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_allclose(got.l2, want.l2, rtol=1e-6)
    # not the latent ranking: the database's rows are its codes
    latent_order = index.search(q_codes, q_fc7, fc7, 30, min_candidates=10 ** 6,
                                reduced=stage_rows("latent", latent=latent),
                                query_reduced=q_latent)
    assert not np.array_equal(got.ids, latent_order.ids)


def test_a_stage_ranking_by_the_latent_needs_the_queries_latent():
    rng = np.random.default_rng(5)
    _, latent, fc7, codes = labelled_features(rng, 50)
    index = HashIndex.build(codes, BITS)
    with pytest.raises(ValueError, match="latent"):
        index.search(codes[:2], fc7[:2], fc7, 5, reduced=stage_rows("latent", latent=latent))


def test_the_hamming_stage_scores_exactly_as_coarse():
    rng = np.random.default_rng(6)
    labels, latent, fc7, codes = labelled_features(rng, 300)
    res = evaluate(codes[:200], labels[:200], codes[200:], labels[200:], db_fc7=fc7[:200],
                   q_fc7=fc7[200:], params=SearchParams(top_k=50),
                   reduced=stage_rows("hamming"))
    assert res["fine"]["map_at_k"] == res["coarse"]["map_at_k"]


# ---- the choice --------------------------------------------------------------------

def test_choose_takes_the_best_not_below_coarse_among_those_available():
    scores = {"fc7": 0.70, "latent": 0.81, "pca": 0.85, "none": 0.80}
    assert choose(scores, 0.75) == "pca"
    assert choose(scores, 0.75, available=("fc7", "latent", "none")) == "latent"
    assert choose(scores, 0.90) == "hamming"          # nothing beats coarse: its own order
    # ties: the stage closest to the codes' own order
    assert choose({"fc7": 0.8, "latent": 0.8, "pca": 0.8}, 0.5) == "latent"
    assert choose({"fc7": 0.8, "pca": 0.8}, 0.5) == "pca"


@pytest.mark.parametrize("fc7_good", [False, True])
def test_the_chosen_stage_never_scores_below_coarse(fc7_good):
    """Held-out images with fc7 made bad (noise): fc7 re-rank scores below
    coarse and is not chosen; with informative fc7 it wins.  Either way the
    choice's score, measured again through evaluate, is >= coarse."""
    rng = np.random.default_rng(7 + fc7_good)
    labels, latent, fc7, codes = labelled_features(rng, 600, fc7_good=fc7_good)
    record = measure_fine_stages(codes, labels, fc7, latent, BITS, top_k=100)
    assert set(record["map_at_k"]) == set(CANDIDATES)
    assert (record["queries"], record["database"], record["k"]) == (300, 300, 100)
    choice, scores, coarse = record["choice"], record["map_at_k"], record["coarse"]
    if fc7_good:
        # fc7 wins (PCA of it, with the best 200 ranked again by fc7, ties it)
        assert choice in ("fc7", "pca") and scores["fc7"] > coarse + 0.05
        assert scores[choice] == max(scores.values())
    else:
        assert scores["fc7"] < coarse - 0.05 and choice != "fc7"
    # measured again, as a search with that stage runs it
    q, db = np.arange(600)[1::2], np.arange(600)[0::2]
    reduced = stage_rows(choice, latent=latent[db]) if choice != "pca" else None
    again = evaluate(codes[db], labels[db], codes[q], labels[q], db_fc7=fc7[db], q_fc7=fc7[q],
                     params=SearchParams(top_k=100), reduced=reduced, q_reduced=latent[q])
    if choice != "pca":
        assert again["fine"]["map_at_k"] == pytest.approx(scores[choice], abs=1e-12)
    assert scores.get(choice, coarse) >= coarse


def test_held_out_images_query_the_training_images_when_given():
    """With database= (training images), every held-out image is a query
    against them: each score equals evaluate's with that stage, run
    directly; the choice is never below coarse."""
    rng = np.random.default_rng(11)
    labels, latent, fc7, codes = labelled_features(rng, 120, fc7_good=False)
    train = labelled_features(rng, 200, fc7_good=False)
    t_labels, t_latent, t_fc7, t_codes = train
    record = measure_fine_stages(codes, labels, fc7, latent, BITS, top_k=50,
                                 database=(t_codes, t_labels, t_fc7, t_latent))
    assert (record["queries"], record["database"], record["k"]) == (120, 200, 50)
    assert "training images" in record["split"]
    for name in ("fc7", "latent", "asymmetric", "none"):
        reduced = None if name == "fc7" else stage_rows(name, latent=t_latent)
        direct = evaluate(t_codes, t_labels, codes, labels, db_fc7=t_fc7, q_fc7=fc7,
                          params=SearchParams(top_k=50), reduced=reduced, q_reduced=latent)
        assert record["map_at_k"][name] == pytest.approx(direct["fine"]["map_at_k"], abs=1e-12)
        assert record["coarse"] == pytest.approx(direct["coarse"]["map_at_k"], abs=1e-12)
    assert record["map_at_k"].get(record["choice"], record["coarse"]) >= record["coarse"]
    # without it, the held-out images split in two: other scores
    halves = measure_fine_stages(codes, labels, fc7, latent, BITS, top_k=50)
    assert (halves["queries"], halves["database"]) == (60, 60)


def test_a_training_sample_is_measured_at_k_scaled_by_its_share():
    """A sample of 200 drawn from 2,000 training images stands for all of
    them: k = 50 becomes 5, and every score equals evaluate's at k = 5
    (its candidates 2 k with it)."""
    assert sampled_top_k(1000, 5000, 50000) == 100
    assert sampled_top_k(1000, 5000, 5000) == sampled_top_k(1000, 5000, None) == 1000
    assert sampled_top_k(10, 30, 1000) == 1          # never below one
    rng = np.random.default_rng(12)
    labels, latent, fc7, codes = labelled_features(rng, 80, fc7_good=False)
    t_labels, t_latent, t_fc7, t_codes = labelled_features(rng, 200, fc7_good=False)
    record = measure_fine_stages(codes, labels, fc7, latent, BITS, top_k=50,
                                 database=(t_codes, t_labels, t_fc7, t_latent),
                                 database_size=2000)
    assert (record["k"], record["database"], record["database_size"]) == (5, 200, 2000)
    assert "of 2000, at k = 5" in record["split"]
    for name in ("fc7", "latent", "none"):
        reduced = None if name == "fc7" else stage_rows(name, latent=t_latent)
        direct = evaluate(t_codes, t_labels, codes, labels, db_fc7=t_fc7, q_fc7=fc7,
                          params=SearchParams(top_k=5), reduced=reduced, q_reduced=latent)
        assert record["map_at_k"][name] == pytest.approx(direct["fine"]["map_at_k"], abs=1e-12)
        assert record["coarse"] == pytest.approx(direct["coarse"]["map_at_k"], abs=1e-12)


def test_too_few_held_out_queries_keep_the_unmeasured_stage(tmp_path):
    """30 queries (fewer than MIN_CHOICE_QUERIES): the scores are kept for
    reading, the choice is UNMEASURED_STAGE and searches use it."""
    rng = np.random.default_rng(5)
    labels, latent, fc7, codes = labelled_features(rng, 2 * (MIN_CHOICE_QUERIES // 2) + 10)
    more = labelled_features(rng, 2 * MIN_CHOICE_QUERIES)
    many = measure_fine_stages(more[3], more[0], more[2], more[1], BITS, top_k=20)
    assert many["queries"] == MIN_CHOICE_QUERIES and many.get("measured", True)
    record = measure_fine_stages(codes, labels, fc7, latent, BITS, top_k=20)
    assert record["queries"] < MIN_CHOICE_QUERIES and record["measured"] is False
    assert record["choice"] == UNMEASURED_STAGE == "asymmetric" and "too few" in record["reason"]
    assert set(record["map_at_k"]) == set(CANDIDATES)
    db, _, _ = labelled_store(tmp_path, record=dict(record, map_at_k={"fc7": 0.9}))
    r = Retriever(db)
    try:       # the scores (here favouring fc7) do not override the unmeasured choice
        assert r.stage == "asymmetric" and "too few" in r.auto_note
    finally:
        r.close()


# ---- --rerank auto and class names on a database ------------------------------------

def labelled_store(tmp_path, n=120, record=None, classes=None):
    """A database whose metadata names a model in tmp_path/run (with
    rerank.json = record and classes.txt = classes when given)."""
    rng = np.random.default_rng(11)
    labels, latent, fc7, codes = labelled_features(rng, n, fc7_good=False)
    run = tmp_path / "run"
    run.mkdir()
    store = FeatureStore.create(tmp_path / "db", {"bits": BITS, "fc7_dim": fc7.shape[1],
                                                  "model": {"weights": str(run / "m.caffemodel")}})
    store.append(fc7, latent, codes, [{"path": f"img{i}.jpg", "label": int(l), "seq": i}
                                      for i, l in enumerate(labels)])
    store.close()
    if record is not None:
        write_rerank_record(run, record)
    if classes is not None:
        (run / "classes.txt").write_text("".join(c + "\n" for c in classes))
    return tmp_path / "db", labels, latent


RECORD = {"choice": "latent", "coarse": 0.5, "map_at_k": {"fc7": 0.4, "latent": 0.6,
                                                         "pca": 0.7, "none": 0.55}, "k": 10}


def test_auto_uses_the_models_record_and_falls_back_without_one(tmp_path):
    db, _, latent = labelled_store(tmp_path, record=dict(RECORD, choice="pca"))
    r = Retriever(db)          # the record prefers pca; no PCA store here: the next best
    assert r.stage == "latent" and "prefers pca" in r.auto_note
    answer = r.search([Query("id 5", exclude_id=5)], r.store.code_rows([5]), r.store.fc7([5]),
                      SearchParams(top_k=10, candidates=10 ** 6))[0]
    assert answer.rerank == "latent"
    # ranked by latent distance: the brute-force order
    want = brute_force_search(r.store.codes(), r.store.fc7_rows(), r.store.code_rows([5]),
                              r.store.fc7([5]), 11, bits=BITS, reduced_rows=latent,
                              query_reduced=latent[[5]])
    assert [h.id for h in answer.hits] == [i for i in want.ids[0] if i != 5][:10]
    r.close()
    forced = Retriever(db, rerank="fc7")
    assert forced.stage == "fc7" and forced.auto_note is None
    forced.close()
    (tmp_path / "run" / "rerank.json").unlink()
    plain = Retriever(db)
    assert plain.stage == "fc7" and "no fine-stage record" in plain.auto_note
    plain.close()
    (tmp_path / "run" / "rerank.json").write_text("{not json")
    with pytest.raises(UserError, match="not a readable fine-stage record"):
        Retriever(db)
    assert read_rerank_record(None) is None


def test_class_names_in_text_json_montage_and_service_answers(tmp_path, monkeypatch):
    db, labels, _ = labelled_store(tmp_path, record=RECORD, classes=["ant", "bee", "cat", "dog"])
    names = ["ant", "bee", "cat", "dog"]
    r = Retriever(db)
    queries, codes, fc7 = r.id_queries([3])
    answer = r.search(queries, codes, fc7, SearchParams(top_k=5))[0]
    assert answer.query.class_name == names[labels[3]]
    assert all(h.class_name == names[h.label] for h in answer.hits)
    table = format_table(answer)
    assert f"(label {labels[3]} {names[labels[3]]})" in table
    assert f"{answer.hits[0].label} {names[answer.hits[0].label]}" in table
    data = json.loads(to_json([answer]))[0]
    assert data["query_class"] == names[labels[3]] and data["query_label"] == int(labels[3])
    assert [(h["label"], h["class_name"]) for h in data["results"]] == \
        [(h.label, names[h.label]) for h in answer.hits]
    # the montage's tiles are titled with the class names
    import matplotlib.figure
    titles = []
    original = matplotlib.figure.Figure.savefig
    def keep_titles(fig, *args, **kwargs):
        titles.extend(ax.get_title() for ax in fig.axes)
        return original(fig, *args, **kwargs)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep_titles)
    montage(answer, tmp_path / "m.png", shown=3)
    assert (tmp_path / "m.png").stat().st_size > 0
    assert names[labels[3]] in titles[0]
    assert [t.split("\n")[1].split(" ")[0] for t in titles[1:]] == \
        [names[h.label] for h in answer.hits[:3]]
    r.close()
    service = QueryService(db, net=False, refresh_seconds=0)
    try:
        [found] = service.search_ids(["3"], service.search_params(top_k=5))
        assert found.rerank == "latent" and found.hits[0].class_name == names[found.hits[0].label]
        assert service.image_record("3")["class_name"] == names[labels[3]]
        assert service.info()["rerank"] == "latent" and service.info()["classes"] == names
        from fastapi.testclient import TestClient
        from dlbhc.serving.webapp import create_app
        with TestClient(create_app(service)) as client:
            [api] = client.get("/api/search?id=3&top_k=5").json()
            assert api["query_class"] == names[labels[3]] and api["rerank"] == "latent"
            assert [(h["label"], h["class_name"]) for h in api["results"]] == \
                [(h.label, h.class_name) for h in found.hits]
            assert client.get("/api/images/3").json()["class_name"] == names[labels[3]]
    finally:
        service.close()


def test_evaluate_prints_every_stage_and_says_how_auto_chose(tmp_path):
    db, _, _ = labelled_store(tmp_path, record=RECORD)
    out = run_script(EVALUATE, ["--database", db, "--queries", db, "--k", 10])
    assert "as recorded for this model" in out.stderr
    for name in ("fine (Hamming + latent)", "also: fc7", "also: none"):
        assert name in out.stdout
    (tmp_path / "run" / "rerank.json").unlink()
    out = run_script(EVALUATE, ["--database", db, "--queries", db, "--k", 10])
    assert "no fine-stage record" in out.stderr and "also: latent" in out.stdout


# ---- train.py writes the record; the scripts and the service use it ----------------

def test_train_records_the_fine_stage_that_retrieve_evaluate_and_serve_use(caffe, tmp_path):
    from test_own_data import CLASSES, colour_collection
    colour_collection(tmp_path / "photos", per_class=8)
    runs = tmp_path / "runs"
    out = run_script(TRAIN, ["--data", tmp_path / "photos", "--net", "cifar", "--runs-dir", runs,
                             "--max-iter", 3, "--batch-size", 5, "--bits", 12,
                             "--test-fraction", 0.5], timeout=600)
    assert "held-out images" in out.stderr and "fine stage:" in out.stderr
    assert "training images through the net" in out.stderr
    run = runs / "cifar_hash12_photos"
    record = json.loads((run / "rerank.json").read_text())
    assert record["choice"] in STAGES and set(record["map_at_k"]) == set(CANDIDATES)
    # every held-out image queries the training images
    train_lines = (run / "train.txt").read_text().splitlines()
    assert (record["queries"], record["database"]) == (12, len(train_lines)) == (12, 12)
    assert record["database_list"] == str(run / "train.txt")
    # 12 queries are too few to choose by: the record keeps the unmeasured
    # stage whatever the scores say (on 3 training steps "asymmetric" can
    # score below coarse; the never-below-coarse rule holds only where the
    # choice was measured, tested above)
    assert record["measured"] is False and record["choice"] == UNMEASURED_STAGE
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["rerank"]["choice"] == record["choice"]
    # the database of the held-out images; then force a stage to see it used
    db = run / "db.lmdb"
    run_script(ROOT / "python" / "extract.py", [run / "test.txt", "--deploy",
                                                run / "deploy.prototxt", "--weights",
                                                summary["weights"], "--out", db, "--workers", 0])
    (run / "rerank.json").write_text(json.dumps(dict(record, choice="none", coarse=0.5, map_at_k={
        "fc7": 0.0, "latent": 0.0, "pca": 0.0, "none": 1.0})))
    query = (run / "test.txt").read_text().split()[0]
    found = json.loads(run_script(RETRIEVE, [query, "--db", db, "--json", "--top-k", 3]).stdout)
    assert found[0]["rerank"] == "latent tie-break"
    assert found[0]["results"][0]["class_name"] in CLASSES
    shown = run_script(RETRIEVE, ["--id", 0, "--db", db, "--top-k", 3]).stdout
    assert any(name in shown for name in CLASSES) and "latent tie-break" in shown
    out = run_script(EVALUATE, ["--database", db, "--queries", db, "--k", 3])
    assert "fine stage none, as recorded" in out.stderr
    assert "fine (Hamming + latent tie-break)" in out.stdout
    service = QueryService(db, refresh_seconds=0)
    try:
        image = (tmp_path / "photos" / CLASSES[1] / "000.jpg").read_bytes()
        answers, _ = service.search_uploads([("q.jpg", image)], service.search_params(top_k=3))
        assert answers[0].rerank == "latent tie-break"
        assert answers[0].hits[0].class_name in CLASSES
    finally:
        service.close()


def test_a_latent_stage_takes_in_the_images_a_refresh_adds(tmp_path):
    db, _, latent = labelled_store(tmp_path, n=60)
    r = Retriever(db, rerank="latent")
    assert len(r.latent_rows()) == 60
    more = labelled_features(np.random.default_rng(12), 30, fc7_good=False)
    # appended by another process, as extract.py does (LMDB: one opening per process)
    np.savez(tmp_path / "more.npz", labels=more[0], latent=more[1], fc7=more[2], codes=more[3])
    import subprocess
    import sys
    subprocess.run([sys.executable, "-c", f"""
import numpy as np
from dlbhc.store.database import FeatureStore
m = np.load({str(tmp_path / "more.npz")!r})
store = FeatureStore.open({str(db)!r}, readonly=False)
store.append(m["fc7"], m["latent"], m["codes"],
             [{{"path": f"new{{i}}.jpg", "label": int(l), "seq": 60 + i}}
              for i, l in enumerate(m["labels"])])
store.close()
"""], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "python")))
    assert r.refresh()
    np.testing.assert_array_equal(r.latent_rows(), np.concatenate([latent, more[1]]))
    queries, codes, fc7 = r.id_queries([75])
    answer = r.search(queries, codes, fc7, SearchParams(top_k=10, candidates=10 ** 6))[0]
    all_latent = np.concatenate([latent, more[1]])
    want = brute_force_search(r.store.codes(), r.store.fc7_rows(), codes, fc7, 11, bits=BITS,
                              reduced_rows=all_latent, query_reduced=all_latent[[75]])
    assert [h.id for h in answer.hits] == [i for i in want.ids[0] if i != 75][:10]
    r.close()
