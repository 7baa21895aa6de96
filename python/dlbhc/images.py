"""Read any image file as RGB uint8, and turn folders or list files into
(path, label) items.

Everything that decodes an image for the project goes through read_image, so
the database, training data and queries see the same pixels whatever the file
format. This module never imports Caffe: it is used by tools and tests that
must run before (or without) a Caffe build.
"""
import io
import os
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import UserError

# Extensions list_images picks up when walking a folder (compared in lower
# case). Pillow reads more formats, but a folder walk must not pick up stray
# .txt/.json/.npy files, so the set is explicit.
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff",
    ".webp", ".ppm", ".pgm", ".pbm", ".pnm",
})

# Same default as Pillow's decompression-bomb limit (about 89 megapixels):
# far above any photo a retrieval database holds, far below what would
# exhaust memory when decoded.
DEFAULT_MAX_PIXELS = 89_478_485

UNKNOWN_LABEL = -1

# Caffe's Datum.label is an int32.
_MAX_LABEL = 2**31 - 1


class BadImage(ValueError):
    """A file that cannot be decoded as an image; .path and .reason say which
    and why (the reason is meant for a user: 'empty file (0 bytes)', ...)."""

    def __init__(self, path, reason):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class ImageItem(NamedTuple):
    """One image to convert: its file, its class label (-1 = unknown) and the
    path as the source named it (relative to the folder or as written in the
    list file), which Caffe's convert_imageset puts into the database key."""
    path: Path
    label: int
    relpath: str = ""


class ImageSet(NamedTuple):
    """What list_images found: the items and, for a folder of class
    subfolders or a list file with class-name labels, the class names in
    label order (label i is classes[i]); None for a list file whose labels
    are numbers (or absent)."""
    items: list
    classes: list = None


# --- decoding -----------------------------------------------------------------

class _StrictTruncation:
    """Force ImageFile.LOAD_TRUNCATED_IMAGES off while decoding.

    Pillow reads that flag as a module global at decode time, and any other
    library in the process may have set it to True, in which case a cut-off
    JPEG silently decodes with grey padding instead of raising. Nested and
    concurrent read_image calls share one counter so the first one in saves the
    caller's value and the last one out restores it."""

    _lock = threading.Lock()
    _depth = 0
    _saved = False

    def __enter__(self):
        with self._lock:
            if _StrictTruncation._depth == 0:
                _StrictTruncation._saved = ImageFile.LOAD_TRUNCATED_IMAGES
                ImageFile.LOAD_TRUNCATED_IMAGES = False
            _StrictTruncation._depth += 1

    def __exit__(self, *exc):
        with self._lock:
            _StrictTruncation._depth -= 1
            if _StrictTruncation._depth == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _StrictTruncation._saved
        return False


def _reason_for(err):
    """A user-facing reason for an exception raised while Pillow decoded."""
    text = str(err) or type(err).__name__
    if isinstance(err, UnidentifiedImageError):
        return "not an image file (no image format recognises its contents)"
    if isinstance(err, Image.DecompressionBombError):
        return f"decompression-bomb guard: {text}"
    lowered = text.lower()
    if "truncated" in lowered or isinstance(err, EOFError):
        return f"truncated image data ({text})"
    return f"corrupt or unsupported image data ({type(err).__name__}: {text})"


def _scale_to_uint8(arr, mode):
    """Map a high-depth single-channel array to 0..255 by scaling its value
    range, never by clipping (clipping a 16-bit image to 255 turns almost every
    pixel white)."""
    if mode.startswith("I;16"):
        # 16-bit: v * 255 / 65535, rounded; exact for 8-bit data stored as
        # v * 257, which is how 8-bit tools write 16-bit files.
        wide = arr.astype(np.uint32)
        return ((wide * 255 + 32767) // 65535).astype(np.uint8)
    arr = arr.astype(np.float64)
    if mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 65535:
        # Pillow opens 16-bit PGM/TIFF (and 16-bit PNG in older versions) as
        # 32-bit "I"; values that fit 16 bits are treated as 16-bit data.
        return np.rint(arr * (255.0 / 65535.0)).astype(np.uint8)
    if mode == "F" and arr.size and np.isfinite(arr).all() \
            and arr.min() >= 0.0 and arr.max() <= 1.0:
        # Floating-point images conventionally hold intensities in [0, 1].
        return np.rint(arr * 255.0).astype(np.uint8)
    # No range is implied by the format (signed or 32-bit integers, floats
    # outside [0, 1]): stretch the image's own min..max onto 0..255.
    arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if hi <= lo:
        return np.full(arr.shape, int(np.clip(lo, 0, 255)), dtype=np.uint8)
    return np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _composite_on_white(rgba):
    """Blend an RGBA uint8 array over a white background (transparent areas
    of logos and icons become white rather than whatever colour the invisible
    pixels happen to store)."""
    rgb = rgba[..., :3].astype(np.float32)
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    out = rgb * alpha + 255.0 * (1.0 - alpha)
    return np.rint(out).astype(np.uint8)


def _to_rgb_array(img):
    """Convert a loaded Pillow image of any mode to an HxWx3 uint8 RGB array."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8)
    if mode.startswith("I;16") or mode in ("I", "F"):
        gray = _scale_to_uint8(np.asarray(img), mode)
        return np.repeat(gray[:, :, None], 3, axis=2)
    has_alpha = (mode in ("RGBA", "RGBa", "LA", "La", "PA")
                 or (mode in ("P", "L", "RGB") and "transparency" in img.info))
    if has_alpha:
        return _composite_on_white(np.asarray(img.convert("RGBA"), dtype=np.uint8))
    # "1", "L", "P", "CMYK", "YCbCr", "HSV": Pillow converts these to RGB
    # itself (CMYK JPEGs written by Adobe tools are inverted; Pillow's JPEG
    # reader already undoes that).
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def read_image(path, max_pixels=DEFAULT_MAX_PIXELS):
    """Decode an image file into an HxWx3 uint8 RGB array.

    Applies the EXIF orientation, so photos come out the way a viewer shows
    them. Grey, palette, CMYK, alpha and 16-bit/float images are all
    converted to 8-bit RGB (alpha is composited on white). Raises BadImage
    for a missing, empty, non-image, truncated or corrupt file, or one larger
    than max_pixels (decompression-bomb guard; Pillow's own hard limit of
    twice PIL.Image.MAX_IMAGE_PIXELS applies as well).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BadImage(path, "file not found") from None
    except PermissionError:
        raise BadImage(path, "permission denied") from None
    except OSError as err:
        raise BadImage(path, f"cannot access file ({err.strerror or err})") from None
    if path.is_dir():
        raise BadImage(path, "is a directory, not an image file")
    if size == 0:
        raise BadImage(path, "empty file (0 bytes)")

    return _decode(path, path, max_pixels)


def decode_image(data, name="upload", max_pixels=DEFAULT_MAX_PIXELS):
    """Decode an upload, bytes or a seekable binary file object (read from
    its start, as Pillow does), like read_image decodes a file: the same conversions,
    checks and BadImage reasons; `name` is what BadImage reports.  The
    decompression-bomb guard reads only the header, so a small file
    declaring a huge image is refused before any pixel buffer exists."""
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    empty = source.seek(0, io.SEEK_END) == 0
    source.seek(0)
    if empty:
        raise BadImage(name, "empty file (0 bytes)")
    return _decode(source, name, max_pixels)


def _decode(source, path, max_pixels):
    """read_image's and decode_image's decoder: `source` is what Image.open
    reads (a path or a file object), `path` what BadImage names."""
    with _StrictTruncation():
        try:
            with Image.open(source) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise BadImage(path, (
                        f"decompression-bomb guard: {width}x{height} = "
                        f"{width * height} pixels is over the limit of "
                        f"{max_pixels}; pass a larger max_pixels if the image "
                        "is genuine"))
                # Image.open only parses the header; load() decodes every
                # pixel, which is what detects truncated or corrupt data.
                img.load()
                img = _apply_exif_orientation(img)
                arr = _to_rgb_array(img)
        except BadImage:
            raise
        except PermissionError:
            raise BadImage(path, "permission denied") from None
        except MemoryError:
            raise BadImage(path, "not enough memory to decode the image") from None
        # Pillow's format plugins raise a wide range of exception types on
        # malformed input (OSError, SyntaxError, struct.error, IndexError,
        # ...). This block contains only Pillow calls, so any exception here
        # is a property of the file, not a bug in this module.
        except Exception as err:  # noqa: BLE001
            raise BadImage(path, _reason_for(err)) from err
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise BadImage(path, f"decoded to an unusable array of shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _apply_exif_orientation(img):
    """Rotate/flip by the EXIF Orientation tag. A malformed EXIF block says
    nothing about the pixels, which have already decoded, so the image is
    kept as stored rather than rejected."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001  (any EXIF parsing failure)
        return img


def resize_for_net(img, size):
    """Squash-resize an HxWx3 uint8 image to size x size (or (height, width)),
    ignoring aspect ratio, as Caffe's convert_imageset does with
    --resize_height/--resize_width.

    Uses Pillow's bicubic filter, which widens its kernel when shrinking and
    so antialiases large photos (Caffe's cv::resize INTER_LINEAR does not);
    the difference to OpenCV's output is a few grey levels. Query images must
    go through this same function so database and queries match."""
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height <= 0 or width <= 0:
        raise ValueError(f"resize size must be positive, got {size!r}")
    if img.shape[0] == height and img.shape[1] == width:
        return img
    resized = Image.fromarray(img).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)


# --- walking inputs -----------------------------------------------------------

def is_image_file(name):
    """True when a file name has one of IMAGE_EXTENSIONS (any case)."""
    return os.path.splitext(str(name))[1].lower() in IMAGE_EXTENSIONS


def list_images(source, root=None):
    """Find the images named by `source` and their labels.

    source is either
      * a folder, walked recursively: each top-level subfolder is a class
        (class names sorted -> labels 0..C-1, returned in .classes); images
        directly in the folder get label -1 (unknown). Hidden files and
        folders (.name) are skipped. Items are sorted by relative path.
      * a list file of `path [label]` lines, Caffe's convert_imageset format:
        blank lines and `#` comments are ignored; the label is the last
        whitespace-separated token when it is an integer (so paths may contain
        spaces), or a class name (see _class_name_of), otherwise -1. Class
        names are labelled as a folder's classes are (sorted names -> labels
        0..C-1, returned in .classes); a list mixing number and name labels
        is refused. Relative paths are resolved against `root` (Caffe's
        ROOTFOLDER), or, without one, against the list file's own folder, so
        a list travels with its images. Items keep the file order.
    Returns an ImageSet(items, classes).
    """
    source = Path(source)
    if source.is_dir():
        if root is not None:
            raise UserError(
                f"--root applies to list files only; {source} is a folder, whose "
                "paths are always relative to itself")
        return _list_folder(source)
    if source.is_file():
        return _list_file(source, root)
    raise UserError(f"image source {source} does not exist: give a folder of images "
                    "or a list file of `path label` lines")


def _list_folder(folder):
    classes = sorted(entry.name for entry in os.scandir(folder)
                     if entry.is_dir() and not entry.name.startswith("."))
    label_of = {name: i for i, name in enumerate(classes)}
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(folder)
        label = label_of[rel_dir.parts[0]] if rel_dir.parts else UNKNOWN_LABEL
        for name in filenames:
            if name.startswith(".") or not is_image_file(name):
                continue
            rel = (rel_dir / name).as_posix()
            found.append(ImageItem(folder / rel, label, rel))
    if not found:
        raise UserError(
            f"no image files found under {folder} (looked for extensions "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
    found.sort(key=lambda item: item.relpath)
    return ImageSet(found, classes)


def _parse_label(token):
    try:
        return int(token)
    except ValueError:
        return None


def _list_file(list_path, root):
    base = Path(root) if root is not None else list_path.parent
    if root is not None and not base.is_dir():
        raise UserError(f"root folder {base} does not exist")
    try:
        text = list_path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(
            f"{list_path} is not a UTF-8 text list file (is it an image? give a "
            "folder or a file of `path label` lines)") from None
    items, names = [], {}       # names: item position -> class name
    numbered = None             # the first line with a number label, for the mixing error
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{list_path}, line {lineno}"
        tokens = line.split()
        label = _parse_label(tokens[-1])
        if label is not None and len(tokens) == 1:
            raise UserError(f"{where}: {line!r} has a label but no image path; "
                            "expected `path [label]`")
        if label is None:
            if _looks_numeric(tokens[-1]) and len(tokens) > 1:
                raise UserError(f"{where}: label {tokens[-1]!r} is not an integer; "
                                "expected `path [label]` with an integer label")
            name = _class_name_of(line, tokens, base)
            if name is None:
                rel, label = line, UNKNOWN_LABEL
            else:
                rel, label = line[: line.rfind(name)].rstrip(), UNKNOWN_LABEL
                names[len(items)] = name
        else:
            rel = line[: line.rfind(tokens[-1])].rstrip()
            if not (UNKNOWN_LABEL <= label <= _MAX_LABEL):
                raise UserError(f"{where}: label {label} is out of range; labels are "
                                f"0..{_MAX_LABEL}, or -1 for unknown")
            if numbered is None and label != UNKNOWN_LABEL:
                numbered = (rel, label)
        items.append(ImageItem(base / rel, label, rel))
    if not items:
        raise UserError(f"{list_path} lists no images (only blank lines or comments)")
    if not names:
        return ImageSet(items, None)
    if numbered is not None:
        position, name = next(iter(names.items()))
        raise UserError(f"{list_path} mixes number labels ({numbered[0]} {numbered[1]}) "
                        f"and name labels ({items[position].relpath} {name}): use one kind")
    classes = sorted(set(names.values()))
    label_of = {name: i for i, name in enumerate(classes)}
    return ImageSet([it._replace(label=label_of[names[i]]) if i in names else it
                     for i, it in enumerate(items)], classes)


def _class_name_of(line, tokens, base):
    """The class name ending a list line, or None when the line is a path
    without a label.  The last word is a class name when it cannot be part
    of a path to an image (no folder separator, no image extension) and the
    whole line does not name an existing file: `cats/1.jpg cats` is image
    cats/1.jpg of class cats, `my photo.jpg` one unlabelled image."""
    name = tokens[-1]
    if len(tokens) < 2 or "/" in name or "\\" in name or is_image_file(name):
        return None
    if (base / line).exists():
        return None
    return name


def _looks_numeric(token):
    try:
        float(token)
    except ValueError:
        return False
    return True


# --- the list of images a tool could not read ------------------------------------

SKIPPED_SUFFIX = ".skipped.tsv"


def skipped_list_path(out):
    """Where the unreadable images of a run writing `out` are listed:
    `<out>.skipped.tsv` beside it (extract.py's feature database, or
    convert_imageset's Datum database)."""
    out = Path(out)
    return out.with_name(out.name + SKIPPED_SUFFIX)


def write_skipped_list(out, skipped, tool):
    """List (path, reason) pairs in `<out>.skipped.tsv`: a `#` header line,
    then `path<TAB>reason` lines, readable by any TSV tool. With nothing
    skipped, a list left by an earlier run is removed, so the file always
    describes the last run. Returns the path, or None when nothing was skipped.
    """
    path = skipped_list_path(out)
    if not skipped:
        path.unlink(missing_ok=True)
        return None
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"# path\treason (files {tool} could not read; fix or remove them, "
                "then rerun)\n")
        for image_path, reason in skipped:
            f.write(f"{image_path}\t{reason}\n")
    return path
