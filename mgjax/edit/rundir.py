"""The folders mgjax writes, recognised by a marker file, so that --overwrite replaces only
what mgjax wrote and --resume continues any run it started, checkpoint or not."""

import json
import os
import shutil

from flow.errors import InputError
from flow.files import TEMPORARY, write_atomic

MARKER = ".mgjax-run.json"


def is_ours(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MARKER))


def digest_of(folder: str) -> str | None:
    """The settings digest the folder's run was started with (None: not recorded)."""
    try:
        with open(os.path.join(folder, MARKER)) as f:
            digest = json.load(f).get("digest")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    return digest if isinstance(digest, str) else None


def check_writable(folder: str, flag: str = "--out_dir") -> None:
    """An InputError unless `folder` is, or can be created as, a writable folder."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise InputError(f"{flag} {folder} is a file; give the path of a folder")
    parent = os.path.dirname(os.path.abspath(folder))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InputError(f"{flag} {folder}: {parent} is a file, not a folder")
    target = folder if os.path.isdir(folder) else parent
    if not os.access(target, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {folder}: {target} is not writable; give another folder")


def check_replaceable(folder: str, flag: str = "--out_dir") -> None:
    """An InputError unless `folder` is absent, empty or written by mgjax, and not a symbolic
    link (replacing removes the folder itself, never what a link points to)."""
    if os.path.islink(os.path.normpath(folder)):
        raise InputError(
            f"{flag} {folder} is a symbolic link; --overwrite replaces only a real folder: give "
            "the folder it points to, or a new --out_dir"
        )
    if os.path.isdir(folder) and os.listdir(folder) and not is_ours(folder):
        raise InputError(
            f"{flag} {folder} was not written by mgjax (it has no {MARKER}); --overwrite "
            "replaces only mgjax's own folders: give a new folder, or empty this one yourself"
        )


def replace(folder: str) -> None:
    """Remove `folder` if mgjax wrote it (an empty folder is removed too); refuse otherwise."""
    check_replaceable(folder)
    if os.path.isdir(folder):
        shutil.rmtree(folder)


def clear(folder: str, keep_folder: bool = False) -> None:
    """Remove a folder mgjax wrote (keep_folder: only its contents); refuse any other."""
    if not is_ours(folder):
        raise InputError(f"{folder} was not written by mgjax; it is left as it is")
    if not keep_folder:
        shutil.rmtree(folder)
        return
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def remove_temporaries(folder: str) -> int:
    """Remove the temporary files (flow.files.write_atomic's) that a killed run left in
    a folder mgjax wrote; returns how many."""
    if not is_ours(folder):
        return 0
    n = 0
    for root, _, names in os.walk(folder):
        for name in names:
            if name.startswith(TEMPORARY):
                os.remove(os.path.join(root, name))
                n += 1
    return n


def claim(folder: str, digest: str | None = None) -> None:
    """Create `folder` (if needed) and mark it as mgjax's, with the run's settings digest."""
    os.makedirs(folder, exist_ok=True)
    if not is_ours(folder):
        text = json.dumps({"written_by": "mgjax", "digest": digest}) + "\n"

        def write(tmp):
            with open(tmp, "w") as f:
                f.write(text)

        write_atomic(os.path.join(folder, MARKER), write)
