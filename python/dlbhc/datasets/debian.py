"""Data sets shipped in pinned Debian packages: the .deb fetched with
`apt-get download` (no root, nothing installed) or given by the user, its
sha256 checked against the pinned one, and unpacked with dpkg-deb into a
scratch folder.  photos.py and fashion_mnist.py read what they need from the
unpacked tree; a collection they write is complete when COMPLETE_MARKER is
in it (written last, then the folder renamed into place)."""
import shutil
import subprocess
from pathlib import Path

from ..errors import UserError
from ..files import file_digest

COMPLETE_MARKER = ".complete"


def apt_download(source, folder):
    """The .deb of `source` (anything with .package and .version) fetched
    by apt-get into folder."""
    spec = f"{source.package}={source.version}"
    if shutil.which("apt-get") is None:
        raise UserError(f"apt-get is not available here: download {spec} on a Debian 12 "
                        "machine (`apt-get download " + spec + "`) and pass the file "
                        "with --deb")
    done = subprocess.run(["apt-get", "download", spec], cwd=folder,
                          capture_output=True, text=True)
    debs = sorted(Path(folder).glob(f"{source.package}_*.deb"))
    if done.returncode != 0 or not debs:
        raise UserError(f"`apt-get download {spec}` failed: "
                        f"{(done.stderr or done.stdout).strip()[-400:]}\n"
                        "Run `apt-get update` first, or download the file elsewhere and "
                        "pass it with --deb")
    return debs[0]


def unpack_checked(source, deb, scratch):
    """The package's files unpacked under scratch/unpacked: `deb` (a path,
    or None to apt-get download it into scratch) after its sha256 matched
    source.sha256.  UserError, with nothing written, otherwise."""
    scratch = Path(scratch)
    deb = Path(deb) if deb is not None else apt_download(source, scratch)
    if not deb.is_file():
        raise UserError(f"{deb}: no such file (the {source.package} package, "
                        f"version {source.version})")
    digest = file_digest(deb, "sha256")
    if digest != source.sha256:
        raise UserError(f"{deb}: sha256 {digest}, expected {source.sha256} "
                        f"({source.package} {source.version}); nothing was written")
    unpacked = scratch / "unpacked"
    done = subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"dpkg-deb could not unpack {deb}: {done.stderr.strip()[-400:]}")
    return deb, unpacked
