"""CIFAR-10 as image folders plus Caffe list files.

get_cifar10 downloads the official release (or takes a local copy: the
official python batches or a tar.gz of JPEG folders), unpacks it into
<dest>/{train,test}/<class>/ images, writes the train/test lists of
`path label` lines and a completion marker. Never imports Caffe: turning the
images into a Datum database is datum.py's job.
"""
import gzip
import io
import json
import os
import pickle
import re
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from ..errors import UserError
from ..files import download, file_digest
from ..progress import Progress
from ..report import get_logger

log = get_logger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_ENV = "CIFAR10_ARCHIVE"
# Label i is CIFAR10_CLASSES[i], the order of the official batches.meta (which
# is also alphabetical, so list_images on the extracted folders agrees).
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
# Archives whose file name we recognise are checked against their published
# digest; any other file name is taken as a user-made copy and not checked.
KNOWN_ARCHIVES = {
    "cifar-10-python.tar.gz": ("md5", CIFAR10_MD5),
    "cifar10-jpg.tar.gz": (
        "sha256", "0e9467361a3721b0cdaadd8259975ded88369b5d8ee16375719280c0b29251a3"),
}
COMPLETE_MARKER = "cifar10.complete.json"
_OFFICIAL_BATCH_ROWS = 10000
_BATCH_RE = re.compile(r"(?:^|/)(data_batch_([1-5])|test_batch)$")
# train/<class>/<file> or test/<class>/<file>, optionally under one top folder.
_JPG_MEMBER_RE = re.compile(r"^(?:[^/]+/)?(train|test)/([^/]+)/([^/]+)$")
_SAFE_FILE_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*\.(?:jpe?g|png)$", re.IGNORECASE)


class CifarResult(NamedTuple):
    dest: Path
    train: int          # number of training images
    test: int           # number of test images
    format: str         # "python" (official batches, PNG out) or "jpg"
    archive: str        # the archive the images came from
    reused: bool        # True when dest was already complete and left alone


def get_cifar10(dest_dir, archive=None, url=CIFAR10_URL, opener=urllib.request.urlopen):
    """Make dest_dir/{train,test}/<class>/*.{png,jpg} plus train.txt, test.txt
    (`relative/path label` lines, labels in CIFAR10_CLASSES order) and
    classes.txt.

    archive (else $CIFAR10_ARCHIVE) is a local copy: either the official
    cifar-10-python.tar.gz (pickled batches, written out as lossless PNG) or a
    tar.gz of train/<class>/*.jpg and test/<class>/*.jpg. Without one, the
    official release is downloaded (with `opener`, urllib's urlopen unless a
    test fakes the network) next to dest_dir and its md5 checked.
    Re-running on a complete dest_dir does nothing; the folder only appears
    once everything (marker file last) has been written.
    """
    dest = Path(dest_dir)
    done = _completed(dest)
    if done:
        return done
    given_by = "archive argument (--archive)" if archive else f"${ARCHIVE_ENV}"
    archive = archive or os.environ.get(ARCHIVE_ENV) or None
    dest.parent.mkdir(parents=True, exist_ok=True)
    if archive:
        archive = Path(archive)
        if not archive.is_file():
            raise UserError(f"CIFAR-10 archive {archive} (from the {given_by}) does "
                            "not exist or is not a file")
        verify_archive(archive)
    else:
        archive = _download_official(url, dest.parent / "cifar-10-python.tar.gz", opener)

    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        fmt = _extract_cifar(archive, tmp)
        counts = _write_cifar_lists(tmp)
        (tmp / "classes.txt").write_text("".join(f"{c}\n" for c in CIFAR10_CLASSES))
        info = {"format": fmt, "archive": str(archive), "train": counts["train"],
                "test": counts["test"], "classes": list(CIFAR10_CLASSES)}
        # Written last: its presence means every image and list is in place.
        (tmp / COMPLETE_MARKER).write_text(json.dumps(info, indent=1) + "\n")
        if dest.is_dir():
            dest.rmdir()        # empty (checked by _completed); rename needs it gone
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CifarResult(dest, counts["train"], counts["test"], fmt, str(archive), False)


def _completed(dest):
    """The CifarResult of a complete dest (its marker is there), or None when
    dest is missing or an empty folder; anything else is refused."""
    marker = dest / COMPLETE_MARKER
    if marker.is_file():
        try:
            info = json.loads(marker.read_text())
            info["train"], info["test"], info["format"], info["archive"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{marker} is damaged; delete {dest} and run again") from None
        log.info("%s is already complete (%s train, %s test images); delete it to rebuild",
                 dest, info["train"], info["test"])
        return CifarResult(dest, info["train"], info["test"], info["format"],
                           info["archive"], True)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(
            f"{dest} exists but is not a complete CIFAR-10 folder (no {COMPLETE_MARKER}); "
            "remove it or choose another destination")
    return None


def verify_archive(archive):
    """Check an archive whose file name is in KNOWN_ARCHIVES against its
    published digest: True when it matches, a UserError when it does not.
    Any other name is a user's own copy: a note is printed and False returned.
    """
    archive = Path(archive)
    known = KNOWN_ARCHIVES.get(archive.name)
    if not known:
        log.warning("note: %s is not a published CIFAR-10 archive name; its checksum is "
                    "not verified", archive.name)
        return False
    algo, expected = known
    actual = file_digest(archive, algo)
    if actual != expected:
        raise UserError(
            f"{archive} has {algo} {actual}, expected {expected}: the file is "
            "damaged or a different version; download it again")
    return True


def _download_official(url, target, opener):
    """Download the official archive to `target` (kept, so a rerun does not
    download again), checking its md5; reuse a good copy already there."""
    if target.is_file():
        if file_digest(target, "md5") == CIFAR10_MD5:
            log.info("using the already downloaded %s", target)
            return target
        log.warning("%s is incomplete or damaged; downloading it again", target)
    return download(
        url, target, "md5", CIFAR10_MD5, label="download cifar-10", opener=opener,
        offline_hint="If this machine is offline, get cifar-10-python.tar.gz elsewhere "
                     f"and pass it with --archive PATH or the {ARCHIVE_ENV} environment "
                     "variable")


class _BatchUnpickler(pickle.Unpickler):
    """The official batches are pickles; a plain pickle.load would run any code
    a tampered archive contains. Only what a dict of numpy arrays needs may be
    loaded."""

    _ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"), ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        # Batches pickled by numpy 1.x name numpy.core, which numpy 2 renamed.
        module = re.sub(r"^numpy\.core\b", "numpy._core", module)
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in batch")
        return super().find_class(module, name)


def _load_batch(data, name):
    try:
        # latin1 is how numpy arrays pickled by Python 2 (the official
        # release) must be read.
        batch = _BatchUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise UserError(f"CIFAR-10 batch {name} is not a valid pickled batch ({err})") from None
    if not isinstance(batch, dict):
        raise UserError(f"CIFAR-10 batch {name} is not a dict")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    rows = np.asarray(batch.get("data"))
    labels = np.asarray(batch.get("labels"))
    if (rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != 3 * 32 * 32
            or labels.shape != (rows.shape[0],) or rows.shape[0] > _OFFICIAL_BATCH_ROWS
            or (labels.size and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)))):
        raise UserError(f"CIFAR-10 batch {name} does not hold uint8 rows of 3072 bytes "
                        "with labels 0..9")
    return rows, labels.astype(int)


def _extract_cifar(archive, out_dir):
    """Stream through the tar archive once, writing images into out_dir.
    Returns the format found ("python", "jpg", or both joined by "+")."""
    for split in ("train", "test"):
        for name in CIFAR10_CLASSES:
            (out_dir / split / name).mkdir(parents=True)
    expected = 60000 if archive.name in KNOWN_ARCHIVES else 0
    progress = Progress(expected, label="extract cifar-10")
    formats = set()
    try:
        # "r|*": sequential read, no seeking, so a large .tar.gz is never
        # unpacked to disk or re-read.
        with tarfile.open(archive, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.removeprefix("./")
                batch = _BATCH_RE.search(name)
                if batch:
                    formats.add("python")
                    _write_batch(tar.extractfile(member).read(), name, batch.group(2),
                                 out_dir, progress)
                elif _copy_jpg_member(tar, member, name, archive, out_dir):
                    formats.add("jpg")
                    progress.update()
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise UserError(f"cannot read CIFAR-10 archive {archive} ({err}); it should be "
                        "a .tar.gz, complete and undamaged") from None
    progress.close()
    if not formats:
        raise UserError(
            f"{archive} holds no CIFAR-10 images: expected the official python batches "
            "(data_batch_1..5, test_batch) or train/<class>/*.jpg and test/<class>/*.jpg")
    return "+".join(sorted(formats))


def _write_batch(data, name, train_number, out_dir, progress):
    """Write the rows of one official batch as lossless PNGs (train_number is
    "1".."5" for data_batch_N, None for test_batch)."""
    rows, labels = _load_batch(data, name)
    if train_number:
        split, offset = "train", (int(train_number) - 1) * _OFFICIAL_BATCH_ROWS
    else:
        split, offset = "test", 0
    for i, (row, label) in enumerate(zip(rows, labels)):
        # Rows are channel-major: 1024 R, 1024 G, 1024 B.
        rgb = row.reshape(3, 32, 32).transpose(1, 2, 0)
        # Named by position in the official split order, so a file traces
        # back to its row in the release.
        path = out_dir / split / CIFAR10_CLASSES[label] / f"{offset + i:05d}.png"
        Image.fromarray(rgb).save(path, format="PNG")
        progress.update()


def _copy_jpg_member(tar, member, name, archive, out_dir):
    """Copy a train/<class>/<file> image of a JPEG archive byte for byte into
    out_dir; False for any other member (readme.html, batches.meta, ...)."""
    match = _JPG_MEMBER_RE.match(name)
    if not match:
        return False
    split, cls, filename = match.groups()
    if cls not in CIFAR10_CLASSES:
        raise UserError(f"{archive}: {name} is in unknown class folder {cls!r}; "
                        f"CIFAR-10 classes are {', '.join(CIFAR10_CLASSES)}")
    if not _SAFE_FILE_RE.match(filename):
        return False        # not an image, or a name we will not write
    target = out_dir / split / cls / filename
    if target.exists():
        raise UserError(f"{archive}: {split}/{cls}/{filename} appears twice")
    target.write_bytes(tar.extractfile(member).read())
    return True


def _write_cifar_lists(root):
    """Write train.txt / test.txt (`split/class/file label`, class order then
    file name) and return the per-split counts."""
    counts = {}
    for split in ("train", "test"):
        lines = []
        for label, cls in enumerate(CIFAR10_CLASSES):
            for name in sorted(os.listdir(root / split / cls)):
                lines.append(f"{split}/{cls}/{name} {label}\n")
        if not lines:
            raise UserError(f"the archive has no {split} images; it is not a complete "
                            "CIFAR-10 archive")
        (root / f"{split}.txt").write_text("".join(lines))
        counts[split] = len(lines)
    return counts
