"""data/get_photos.py: a collection of real photos the project has never seen
(Debian's gcompris-qt-data), and `make train DATA=...` on it end to end."""
import io
import json
import shutil
import subprocess

import pytest
from PIL import Image

from dlbhc.datasets import photos
from dlbhc.errors import UserError
from helpers import EXTRACT, ROOT, TRAIN, run_script, write_rcc

GET_PHOTOS = ROOT / "data" / "get_photos.py"
EVALUATE = ROOT / "python" / "evaluate.py"


def webp(colour, size=(80, 70)):
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "WEBP", lossless=True)
    return out.getvalue()


@pytest.mark.parametrize("version", [1, 2, 3])
def test_rcc_reader_returns_the_files_written(tmp_path, version):
    files = {"a/b/one.webp": webp((255, 0, 0)), "a/b/README": b"credits\n",
             "a/two.txt": b"x" * 1000, "top.bin": bytes(range(256))}
    path = write_rcc(tmp_path / "t.rcc", files, version=version, compress={"a/two.txt"})
    assert photos.read_rcc(path) == files


def test_rcc_reader_refuses_foreign_and_damaged_files(tmp_path):
    (tmp_path / "foreign.rcc").write_bytes(b"PK\x03\x04" + bytes(40))
    with pytest.raises(UserError, match="not a Qt resource file"):
        photos.read_rcc(tmp_path / "foreign.rcc")
    good = write_rcc(tmp_path / "good.rcc", {"d/f.bin": b"y" * 500})
    blob = good.read_bytes()
    (tmp_path / "cut.rcc").write_bytes(blob[:len(blob) - 300])
    with pytest.raises(UserError, match="damaged"):
        photos.read_rcc(tmp_path / "cut.rcc")
    # a folder claiming 2**32 - 1 entries: refused at once, nothing allocated for them
    import struct
    root_count_at = 4 + 16 + 4 + 2             # version 2: header, then the root's count
    huge = bytearray(blob)
    huge[root_count_at:root_count_at + 4] = struct.pack(">I", 2**32 - 1)
    (tmp_path / "huge.rcc").write_bytes(bytes(huge))
    with pytest.raises(UserError, match="past the file's end"):
        photos.read_rcc(tmp_path / "huge.rcc")
    (tmp_path / "v9.rcc").write_bytes(b"qres" + (9).to_bytes(4, "big") + blob[8:])
    with pytest.raises(UserError, match="version 9"):
        photos.read_rcc(tmp_path / "v9.rcc")


def fake_package(tmp_path, per_class=3):
    """A .deb laid out like gcompris-qt-data, with generated photos; its
    DebianPhotos (sha256 of this file)."""
    source = photos.GCOMPRIS
    files = {}
    for k, folder in enumerate(source.classes.values()):
        for i in range(per_class):
            files[f"{source.images}/{folder}/img{i}.webp"] = webp((60 * k, 10 * i, 200 - 40 * k))
        files[f"{source.images}/{folder}/README"] = f"credits of {folder}\n".encode()
    files[f"{source.images}/others/odd.webp"] = webp((1, 2, 3))
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: fake-photos\nVersion: 1\nArchitecture: all\nMaintainer: t <t@t>\n"
        "Description: test\n")
    rcc = root / source.rcc
    rcc.parent.mkdir(parents=True)
    write_rcc(rcc, files, compress={f"{source.images}/fishes/README"})
    deb = tmp_path / "fake-photos_1_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(deb)],
                   check=True, capture_output=True)
    from dlbhc.files import file_digest
    return deb, source._replace(package="fake-photos", version="1",
                                sha256=file_digest(deb, "sha256"))


def test_collection_from_a_package_and_a_wrong_checksum_refused(tmp_path):
    deb, source = fake_package(tmp_path)
    result = photos.get_photos(tmp_path / "out", deb=deb, source=source)
    assert result.counts == {c: 3 for c in source.classes} and not result.reused
    for cls in source.classes:
        assert sorted(p.name for p in (result.dest / cls).iterdir()) == \
            ["img0.png", "img1.png", "img2.png"]
    assert (result.dest / "attribution" / "fish.txt").read_text() == "credits of fishes\n"
    assert Image.open(result.dest / "tools" / "img1.png").getpixel((5, 5)) == (180, 10, 80)
    assert photos.get_photos(tmp_path / "out", deb=deb, source=source).reused
    with pytest.raises(UserError, match="sha256"):
        photos.get_photos(tmp_path / "other", deb=deb, source=source._replace(sha256="0" * 64))
    assert not (tmp_path / "other").exists()
    missing = run_script(GET_PHOTOS, ["--dest", tmp_path / "x", "--deb", tmp_path / "no.deb"],
                         check=False)
    assert missing.returncode != 0 and "no such file" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.network
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs Debian's apt-get")
def test_train_and_evaluate_on_real_photos_never_seen(caffe, tmp_path):
    """The issue's bar: a folder of class subfolders of real photos trains
    and evaluates through train.py --data (what `make train DATA=` runs)
    with default settings, no file edited."""
    got = run_script(GET_PHOTOS, ["--dest", tmp_path / "photos"], timeout=600)
    collection = tmp_path / "photos" / "gcompris-categorization"
    assert "123 photos" in got.stdout
    runs = tmp_path / "runs"
    run_script(TRAIN, ["--data", collection, "--runs-dir", runs,
                       "--cache-dir", tmp_path / "cache"], timeout=1800)
    run = runs / "efficientnet_lite0_hash48_gcompris-categorization"
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["classes"] == ["fish", "monuments", "renewable_energy", "tools"]
    weights = summary["weights"]
    for part in ("train", "test"):
        run_script(EXTRACT, [run / f"{part}.txt", "--deploy", run / "deploy.prototxt",
                             "--weights", weights, "--out", run / f"db_{part}.lmdb"],
                   timeout=900)
    run_script(EVALUATE, ["--database", run / "db_train.lmdb", "--queries",
                          run / "db_test.lmdb", "--k", 1000, "--out-dir", run / "evaluation"])
    figures = json.loads((run / "evaluation" / "figures.json").read_text())
    # 13 held-out photos against 110 (4 classes): chance is ~0.25-0.3; measured 0.98.
    assert (figures["n_database"], figures["n_queries"]) == (110, 13)
    assert figures["coarse"]["map_at_k"] >= 0.6, figures["coarse"]["map_at_k"]
