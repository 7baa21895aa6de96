"""Pretrained weights from Caffe's model zoo: download with a sha1 check.

Each model has a readme.md under models/<name>/ with Caffe's model-zoo
front matter (caffemodel, caffemodel_url, sha1), the format Caffe's own
scripts/download_model_binary.py reads.
"""
import hashlib
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

from .errors import UserError
from .progress import Progress

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"


def read_frontmatter(readme):
    lines = Path(readme).read_text().splitlines()
    if not lines or lines[0].strip() != "---":
        raise UserError(f"{readme}: no front matter (--- ... ---)")
    fields = {}
    for line in lines[1:]:
        if line.strip() == "---":
            break
        name, _, value = line.partition(":")
        fields[name.strip()] = value.strip()
    for required in ("caffemodel", "caffemodel_url", "sha1"):
        if required not in fields:
            raise UserError(f"{readme}: front matter lacks {required}")
    return fields


def sha1_of(path):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(model_name, models_dir=MODELS_DIR, opener=urllib.request.urlopen, log=sys.stderr):
    """Download models/<name>/<caffemodel> unless a file with the right sha1 is there."""
    folder = Path(models_dir) / model_name
    readme = folder / "readme.md"
    if not readme.exists():
        known = sorted(p.name for p in Path(models_dir).iterdir() if (p / "readme.md").exists())
        raise UserError(f"unknown model {model_name!r}; known: {', '.join(known)}")
    info = read_frontmatter(readme)
    target = folder / info["caffemodel"]
    if target.exists():
        if sha1_of(target) == info["sha1"]:
            print(f"{target} present, sha1 ok", file=log)
            return target
        raise UserError(f"{target} exists but its sha1 is not {info['sha1']}: a partial or "
                        "different file; delete it and run again")
    partial = target.with_suffix(target.suffix + ".partial")
    url = info["caffemodel_url"]
    try:
        with opener(url, timeout=60) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            progress = Progress(total or None, label=info["caffemodel"], unit="B", interval=2)
            while True:
                chunk = response.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk)
                progress.update(len(chunk))
            progress.close()
    except (urllib.error.URLError, OSError) as err:
        partial.unlink(missing_ok=True)
        raise UserError(
            f"cannot download {url}: {err}\nDownload it on a machine with internet access "
            f"and put it at {target} (sha1 {info['sha1']}), then run this again to check it.") from err
    digest = sha1_of(partial)
    if digest != info["sha1"]:
        partial.unlink(missing_ok=True)
        raise UserError(f"downloaded {url} has sha1 {digest}, expected {info['sha1']}: "
                        "not kept; try again")
    shutil.move(partial, target)
    print(f"{target}: sha1 ok", file=log)
    return target
