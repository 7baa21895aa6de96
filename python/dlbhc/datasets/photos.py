"""A small collection of real photos in class folders, for trying training on
one's own collection (`make train DATA=...`) on images the project has never
seen.

The photos come from a Debian package, so that any Debian machine can make
the same folders: GCompris's "categorization" activity ships 123 photos of
fish, monuments, renewable energy and tools (mostly from Wikimedia Commons;
public domain or CC0 but one GPLv2+, per-image credits in the package and
copied beside the photos; the package is GPL-3+).  They sit as WebP files
inside a Qt binary resource bundle (.rcc), read here by `read_rcc`.  The
package is fetched with `apt-get download` at a pinned version and its
sha256 checked; nothing is installed.

Never imports Caffe.
"""
import io
import shutil
import struct
import tempfile
import zlib
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from ..errors import UserError
from ..files import atomic_write, replace_dir
from ..images import is_image_file
from .debian import COMPLETE_MARKER, unpack_checked

# Images narrower than this on either side are left out (none in the
# pinned package; a guard for other versions).
MIN_SIDE = 64


class DebianPhotos(NamedTuple):
    """Where a photo collection lives in a Debian package."""
    name: str                 # the collection's folder name
    package: str
    version: str
    sha256: str               # of the .deb file
    rcc: str                  # the resource bundle inside the package
    images: str               # the folder of class folders inside the bundle
    classes: dict             # class name -> folder in `images`
    license: str


GCOMPRIS = DebianPhotos(
    name="gcompris-categorization",
    package="gcompris-qt-data", version="3.1-2",
    sha256="e9cf06ab2105529068df73085784e835d2ff03f870d2a8091f09125d40abac9f",
    rcc="usr/share/gcompris-qt/rcc/categorization.rcc",
    images="gcompris/src/activities/categorization/resource/images",
    classes={"fish": "fishes", "monuments": "monuments",
             "renewable_energy": "renewable", "tools": "tools"},
    license="package GPL-3+; photos public domain / CC0 (one GPLv2+), "
            "credits per image in attribution/<class>.txt")


# ---- Qt binary resource bundles (rcc) --------------------------------------------
# Layout (Qt's rcc format, versions 1-3): "qres", then big-endian uint32
# version, tree offset, data offset, names offset (version 3 adds a flags
# word).  Tree nodes: name offset (uint32), flags (uint16; 1 zlib, 2
# directory, 4 zstd), then a directory's child count and first child
# (uint32 each) or a file's country/language (uint16 each) and data offset
# (uint32); version >= 2 adds an 8-byte modification time to every node.
# Names: uint16 length, uint32 hash, UTF-16BE characters.  Data: uint32 size
# then the bytes; zlib data starts with its own uint32 uncompressed size.
RCC_MAGIC = b"qres"
RCC_ZLIB, RCC_DIRECTORY, RCC_ZSTD = 1, 2, 4


def read_rcc(path):
    """{path inside the bundle: bytes} of every file of a Qt .rcc file.
    A damaged or foreign file raises UserError naming it."""
    path = Path(path)
    blob = path.read_bytes()

    def unpack(fmt, offset):
        end = offset + struct.calcsize(fmt)
        if offset < 0 or end > len(blob):
            raise UserError(f"{path}: damaged Qt resource file (a record at byte {offset} "
                            f"runs past its end, {len(blob)} bytes)")
        return struct.unpack_from(fmt, blob, offset)

    if blob[:4] != RCC_MAGIC:
        raise UserError(f"{path} is not a Qt resource file (.rcc): it does not start "
                        f"with {RCC_MAGIC!r}")
    version, tree, data, names = unpack(">IIII", 4)
    if version not in (1, 2, 3):
        raise UserError(f"{path}: Qt resource format version {version} is not known "
                        "(1-3 are)")
    node_size = 14 + (8 if version >= 2 else 0)

    def name(offset):
        (length,) = unpack(">H", names + offset)
        start = names + offset + 6
        if start + 2 * length > len(blob):
            raise UserError(f"{path}: damaged Qt resource file (a name runs past its end)")
        return blob[start:start + 2 * length].decode("utf-16-be")

    files = {}
    pending = [(0, "")]
    seen = set()
    while pending:
        node, prefix = pending.pop()
        if node in seen:
            raise UserError(f"{path}: damaged Qt resource file (node {node} appears twice)")
        seen.add(node)
        base = tree + node * node_size
        name_offset, flags = unpack(">IH", base)
        here = f"{prefix}/{name(name_offset)}" if node else ""
        if flags & RCC_DIRECTORY:
            count, first = unpack(">II", base + 6)
            if tree + (first + count) * node_size > len(blob):
                raise UserError(f"{path}: damaged Qt resource file (folder {here or '/'} "
                                f"names {count} entries past the file's end)")
            pending.extend((child, here) for child in range(first, first + count))
            continue
        (data_offset,) = unpack(">I", base + 10)
        (size,) = unpack(">I", data + data_offset)
        start = data + data_offset + 4
        if start + size > len(blob):
            raise UserError(f"{path}: damaged Qt resource file ({here} runs past its end)")
        payload = blob[start:start + size]
        if flags & RCC_ZLIB:
            try:
                payload = zlib.decompress(payload[4:])
            except zlib.error as err:
                raise UserError(f"{path}: {here} does not decompress: {err}") from None
        elif flags & RCC_ZSTD:
            raise UserError(f"{path}: {here} is zstd-compressed, which this reader does "
                            "not handle")
        files[here.lstrip("/")] = payload
    return files


# ---- the collection ----------------------------------------------------------------
class PhotoResult(NamedTuple):
    dest: Path                # the collection: dest/<class>/*.png
    counts: dict              # class -> images
    reused: bool


def get_photos(dest_root, deb=None, source=GCOMPRIS):
    """The collection `source` as dest_root/<source.name>/<class>/*.png, with
    attribution/<class>.txt (the package's per-image credits) and SOURCE.txt.
    deb: the package file (default: apt-get download); its sha256 must be
    the pinned one.  Reused when already complete; written in a .partial
    folder and renamed, so an interrupted run leaves nothing half-made."""
    dest = Path(dest_root) / source.name
    if (dest / COMPLETE_MARKER).exists():
        counts = {c: len(list((dest / c).glob("*.png"))) for c in source.classes}
        return PhotoResult(dest, counts, True)
    with tempfile.TemporaryDirectory(prefix="dlbhc-photos-") as tmp:
        tmp = Path(tmp)
        deb, unpacked = unpack_checked(source, deb, tmp)
        bundle = unpacked / source.rcc
        if not bundle.is_file():
            raise UserError(f"{deb} has no {source.rcc}")
        files = read_rcc(bundle)
        partial = dest.with_name(dest.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        counts = _write_classes(files, source, partial)
        replace_dir(partial, dest)
    return PhotoResult(dest, counts, False)


def _write_classes(files, source, out):
    counts = {}
    (out / "attribution").mkdir(parents=True)
    for cls, folder in source.classes.items():
        prefix = f"{source.images}/{folder}/"
        members = sorted(p for p in files if p.startswith(prefix) and "/" not in p[len(prefix):])
        if f"{prefix}README" in files:
            (out / "attribution" / f"{cls}.txt").write_bytes(files[f"{prefix}README"])
        (out / cls).mkdir()
        counts[cls] = 0
        for member in members:
            if not is_image_file(member):
                continue
            with Image.open(io.BytesIO(files[member])) as image:
                if min(image.size) < MIN_SIDE:
                    continue
                image.convert("RGB").save(out / cls / (Path(member).stem + ".png"))
            counts[cls] += 1
        if counts[cls] == 0:
            raise UserError(f"{source.package} {source.version}: no images in "
                            f"{source.rcc}:{prefix}")
    lines = [f"collection: {source.name}",
             f"source: Debian package {source.package} {source.version} "
             f"(apt-get download {source.package}={source.version}), "
             f"sha256 {source.sha256}, {source.rcc}:{source.images}",
             f"license: {source.license}",
             "classes: " + ", ".join(f"{c} {n}" for c, n in counts.items())]
    atomic_write(out / "SOURCE.txt", lambda f: f.write("\n".join(lines).encode() + b"\n"))
    atomic_write(out / COMPLETE_MARKER, lambda f: f.write(b"ok\n"))
    return counts
