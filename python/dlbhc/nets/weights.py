"""Pretrained weights from Caffe's model zoo: download with a sha1 check.

Each model has a readme.md under models/<name>/ with Caffe's model-zoo
front matter (caffemodel, caffemodel_url, sha1), the format Caffe's own
scripts/download_model_binary.py reads.
"""
import urllib.request
from pathlib import Path

from ..errors import UserError
from ..files import download, file_digest
from ..report import get_logger

log = get_logger(__name__)

MODELS_DIR = Path(__file__).resolve().parents[3] / "models"


ZOO_FIELDS = ("caffemodel", "caffemodel_url", "sha1")


def read_frontmatter(readme, required=ZOO_FIELDS):
    """The `key: value` lines between a readme's leading `---` lines; a
    UserError when one of `required` is missing."""
    lines = Path(readme).read_text().splitlines()
    if not lines or lines[0].strip() != "---":
        raise UserError(f"{readme}: no front matter (--- ... ---)")
    fields = {}
    for line in lines[1:]:
        if line.strip() == "---":
            break
        name, _, value = line.partition(":")
        fields[name.strip()] = value.strip()
    for field in required:
        if field not in fields:
            raise UserError(f"{readme}: front matter lacks {field}")
    return fields


def fetch(model_name, models_dir=MODELS_DIR, opener=urllib.request.urlopen):
    """Download models/<name>/<caffemodel> unless a file with the right sha1 is there."""
    folder = Path(models_dir) / model_name
    readme = folder / "readme.md"
    if not readme.exists():
        known = sorted(p.name for p in Path(models_dir).iterdir() if (p / "readme.md").exists())
        raise UserError(f"unknown model {model_name!r}; known: {', '.join(known)}")
    info = read_frontmatter(readme)
    target = folder / info["caffemodel"]
    if target.exists():
        if file_digest(target, "sha1") == info["sha1"]:
            log.info("%s present, sha1 ok", target)
            return target
        raise UserError(f"{target} exists but its sha1 is not {info['sha1']}: a partial or "
                        "different file; delete it and run again")
    download(info["caffemodel_url"], target, "sha1", info["sha1"], label=info["caffemodel"],
             opener=opener,
             offline_hint=f"Download it on a machine with internet access and put it at "
                          f"{target} (sha1 {info['sha1']}), then run this again to check it.")
    log.info("%s: sha1 ok", target)
    return target
