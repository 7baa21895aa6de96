"""Files on disk: digests, atomic writes, checked downloads, and which
key-value database (LMDB or LevelDB) a folder holds.

Every module that hashes a file, writes a file readers must never see half
done, or downloads something with a published checksum does it through
here, so each of those rules has one home. Never imports Caffe.
"""
import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from .errors import UserError
from .progress import Progress

CHUNK_BYTES = 1 << 20


def file_digest(path, algo="sha1"):
    """Hex digest of a file's bytes (sha1, md5, sha256, ...), read in chunks."""
    digest = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path, write, fsync=False):
    """Create `path` through a temporary file in the same folder and a rename,
    so a reader sees the old file or the whole new one, never a part.

    write(f) writes the content to a binary file object. fsync=True also
    forces the bytes to disk before the rename (for files whose loss after a
    crash would cost more than rebuilding them).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); the result gets the mode a
        # plain open() would have given it.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir(new, target):
    """Move the finished folder `new` to `target`, replacing an old `target`
    only after the new one is complete."""
    new, target = Path(new), Path(target)
    if target.exists():
        old = target.with_name(target.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.rename(target, old)
        os.rename(new, target)
        shutil.rmtree(old)
    else:
        os.rename(new, target)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def download(url, target, algo, expected, label=None, opener=urllib.request.urlopen,
             offline_hint=""):
    """Download `url` to `target`, checking the file's `algo` digest.

    The bytes go to `target.partial` first and are renamed only when the
    digest matches, so `target` is never a partial or wrong file. Shows
    progress (bytes/s, ETA). A network failure or a wrong digest is a
    UserError; `offline_hint` is appended to the network failure's message
    (how to get the file on an offline machine).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.new(algo)
    try:
        with opener(url, timeout=60) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            progress = Progress(total or None, label=label or target.name, unit="B",
                                interval=2)
            for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                out.write(chunk)
                digest.update(chunk)
                progress.update(len(chunk))
            progress.close()
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        partial.unlink(missing_ok=True)
        reason = getattr(err, "reason", err)
        raise UserError(f"cannot download {url} ({reason})"
                        + (f"\n{offline_hint}" if offline_hint else "")) from None
    actual = digest.hexdigest()
    if actual != expected:
        partial.unlink(missing_ok=True)
        raise UserError(f"downloaded {url} has {algo} {actual}, expected {expected}: "
                        "the download was damaged or the file changed; not kept, run again")
    os.replace(partial, target)
    return target


def database_backend(path):
    """'lmdb' or 'leveldb' from the files inside a database folder, or None
    when the folder holds neither (callers decide whether that is an error)."""
    path = Path(path)
    if (path / "data.mdb").exists():
        return "lmdb"
    if (path / "CURRENT").exists():
        return "leveldb"
    return None
