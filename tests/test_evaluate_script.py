"""python/evaluate.py end to end on tiny generated inputs (a subprocess, as a
user runs it): .npz files and a feature store folder."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import DB_CODES, DB_LABELS, PNG_MAGIC, Q_CODES, Q_LABELS

SCRIPT = Path(__file__).resolve().parents[1] / "python" / "evaluate.py"
DB_FC7 = np.array([[9.0], [1.0], [3.0], [-1.0], [0.5], [0.0]], np.float32)
Q_FC7 = np.zeros((3, 1), np.float32)


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def write_npz(path, codes, labels, fc7=None, bits=8):
    arrays = {"codes": codes, "labels": labels, "bits": np.array(bits)}
    if fc7 is not None:
        arrays["fc7"] = fc7
    np.savez(path, **arrays)
    return path


def test_npz_inputs_give_the_hand_computed_figures(tmp_path):
    db = write_npz(tmp_path / "db.npz", DB_CODES, DB_LABELS, DB_FC7)
    q = write_npz(tmp_path / "q.npz", Q_CODES, Q_LABELS, Q_FC7)
    out = tmp_path / "out"
    proc = run("--database", db, "--queries", q, "--k", 3, "--min-candidates", 3,
               "--out-dir", out)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads((out / "figures.json").read_text())
    # the hand computation of test_metrics.test_evaluate_reproduces_hand_computed_figures
    assert figures["coarse"]["map_at_k"] == pytest.approx((1 / 3 + 0 + 5 / 6) / 3)
    assert figures["coarse"]["precision_radius"] == pytest.approx((2 / 5 + 0 + 1) / 3)
    assert figures["k"] == 3 and figures["bits"] == 8
    # fine, 3 candidates wanted (fc7 squared distances to the queries' 0):
    #   q0: radius 1 {2, 1, 3} -> 1, 3 (tie, id order), 2 -> rel 0 1 0 -> AP@3 1/2
    #   q1: radius 6 {4, 0, 5} -> 5 (0), 4 (0.25), 0 (81) -> nothing relevant -> 0
    #   q2: radius 5 {4, 1, 0, 2} -> 4 (0.25), 1 (1), 2 (9), 0 (81) -> rel 1 0 0 -> 1
    assert figures["fine"]["map_at_k"] == pytest.approx((1 / 2 + 0 + 1) / 3)
    assert figures["fine"]["candidates_mean"] == pytest.approx((3 + 3 + 4) / 3)
    assert figures["fine"]["min_candidates"] == 3
    for name in ("precision_at_k.png", "precision_recall.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert "coarse (Hamming)" in proc.stdout and "fine (Hamming + fc7)" in proc.stdout


def test_no_fine_and_inputs_without_fc7_evaluate_hamming_only(tmp_path):
    db = write_npz(tmp_path / "db.npz", DB_CODES, DB_LABELS, DB_FC7)
    q = write_npz(tmp_path / "q.npz", Q_CODES, Q_LABELS)   # no fc7
    out = tmp_path / "out"
    proc = run("--database", db, "--queries", q, "--k", 3, "--out-dir", out)
    assert proc.returncode == 0, proc.stderr
    assert "Hamming ranking only" in proc.stderr
    assert "fine" not in json.loads((out / "figures.json").read_text())
    q = write_npz(tmp_path / "q2.npz", Q_CODES, Q_LABELS, Q_FC7)
    proc = run("--database", db, "--queries", q, "--k", 3, "--no-fine", "--out-dir", out)
    assert proc.returncode == 0, proc.stderr
    assert "fine" not in json.loads((out / "figures.json").read_text())


def test_feature_store_folder_gives_the_same_figures_as_npz(tmp_path):
    from dlbhc.store.database import FeatureStore
    store = FeatureStore.create(tmp_path / "db.lmdb", {"bits": 8, "fc7_dim": 1})
    latent = np.unpackbits(DB_CODES, axis=1).astype(np.float32)
    store.append(DB_FC7, latent, DB_CODES,
                 [{"path": f"img{i}.png", "label": int(lab), "seq": i}
                  for i, lab in enumerate(DB_LABELS)])
    store.close()
    q = write_npz(tmp_path / "q.npz", Q_CODES, Q_LABELS, Q_FC7)
    db_npz = write_npz(tmp_path / "db.npz", DB_CODES, DB_LABELS, DB_FC7)
    figures = []
    for db in (tmp_path / "db.lmdb", db_npz):
        out = tmp_path / db.name.replace(".", "_")
        proc = run("--database", db, "--queries", q, "--k", 3, "--out-dir", out)
        assert proc.returncode == 0, proc.stderr
        figures.append(json.loads((out / "figures.json").read_text()))
    for method in ("coarse", "fine"):
        for figure in ("map_at_k", "map", "precision_at_k"):
            assert figures[0][method][figure] == figures[1][method][figure]


def test_user_errors_are_reported_without_traceback(tmp_path):
    q = write_npz(tmp_path / "q.npz", Q_CODES, Q_LABELS)
    proc = run("--database", tmp_path / "missing.npz", "--queries", q)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    db = write_npz(tmp_path / "db16.npz", np.zeros((4, 2), np.uint8), np.zeros(4, int), bits=16)
    proc = run("--database", db, "--queries", q)
    assert proc.returncode == 2 and "16-bit" in proc.stderr
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    proc = run("--database", tmp_path / "junk.npz", "--queries", q)
    assert proc.returncode == 2 and "cannot read" in proc.stderr


def test_removed_images_are_left_out_of_the_evaluation(tmp_path):
    """A store with removed images evaluates as the npz of its live rows."""
    from dlbhc.store.database import FeatureStore
    extra_codes = np.vstack([DB_CODES, DB_CODES[:2] ^ 1])   # two near copies, then removed
    extra_fc7 = np.vstack([DB_FC7, DB_FC7[:2]])
    extra_labels = np.concatenate([DB_LABELS, 1 - np.asarray(DB_LABELS[:2])])
    store = FeatureStore.create(tmp_path / "db.lmdb", {"bits": 8, "fc7_dim": 1})
    store.append(extra_fc7, np.unpackbits(extra_codes, axis=1).astype(np.float32), extra_codes,
                 [{"path": f"img{i}.png", "label": int(lab), "seq": i}
                  for i, lab in enumerate(extra_labels)])
    store.remove([len(DB_CODES), len(DB_CODES) + 1])
    store.close()
    q = write_npz(tmp_path / "q.npz", Q_CODES, Q_LABELS, Q_FC7)
    with_all = write_npz(tmp_path / "all.npz", extra_codes, extra_labels, extra_fc7)
    live = write_npz(tmp_path / "live.npz", DB_CODES, DB_LABELS, DB_FC7)
    figures = {}
    for db in (tmp_path / "db.lmdb", live, with_all):
        out = tmp_path / db.name.replace(".", "_")
        proc = run("--database", db, "--queries", q, "--k", 3, "--out-dir", out)
        assert proc.returncode == 0, proc.stderr
        figures[db.name] = json.loads((out / "figures.json").read_text())
    for method in ("coarse", "fine"):
        assert figures["db.lmdb"][method]["map"] == figures["live.npz"][method]["map"]
    assert figures["all.npz"]["coarse"]["map"] != figures["live.npz"]["coarse"]["map"]
