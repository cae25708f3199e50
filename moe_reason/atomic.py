"""Writing so that a crash never leaves a half-written file or folder, and nothing is deleted that this
process did not write: the one place files and folders are put into place.

A file or folder is written under a fresh hidden name beside its destination (`.NAME.XXXXXXXX.tmp`,
created here, so no other file can have it) and renamed into place once complete. A folder that
replaces an older one moves the older one aside under another fresh name first and deletes it last.
"""

import os
import shutil
import tempfile
from pathlib import Path


def staged(final: Path) -> Path:
    """A new empty folder beside `final`, named after it and unique: write into it, then `install` it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide the installed folder from the group
    return folder


def install(tmp: Path, final: Path, keep_existing: bool = False) -> None:
    """Rename the complete folder `tmp` to `final`. An existing `final` is replaced (moved aside, then deleted);
    with `keep_existing` it is kept and `tmp` deleted instead (a cache entry another process finished first)."""
    tmp, final = Path(tmp), Path(final)
    if not final.exists():
        tmp.rename(final)
        return
    if keep_existing:
        shutil.rmtree(tmp)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
    os.replace(final, aside)  # onto the empty folder just made for it
    tmp.rename(final)
    shutil.rmtree(aside)


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically, with the permissions a plain open() would give it."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def readable_like_the_rest(folder: Path) -> None:
    """Give every file in `folder` the mode this process's umask gives new files (safetensors and tempfile
    write theirs 0600, so a folder shared with a group would be missing its weights)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(folder).iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)
