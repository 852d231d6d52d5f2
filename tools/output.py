"""
output.py: where the tools put what they make (a page, a table, a figure). The folder is checked before the work
starts, so that a bad path costs one line, not minutes of work and a traceback; each file is written whole or not
at all, so that a full disk leaves no partial file behind.

    writable_dir    make a folder (and its parents) and create a file in it, or raise UserError naming it
    write           a file's text (or bytes) written whole (a temporary beside it, renamed over it), or raise UserError
"""
import contextlib
import os
import tempfile

from grpo_family import config


def writable_dir(path, named):
    """Make `path` and prove a file can be created in it; a UserError that opens with `named` (how the user gave
    it: '--out_dir=runs/x') if not."""
    if not path:
        raise config.UserError(f"{named} names no folder: give one (it is made if missing)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise config.UserError(f"{named} is a file, not a folder: name a folder (it is made if missing)")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:  # a file on the way, no permission, a read-only or full disk
        raise config.UserError(f"{named} is not a writable folder ({e.strerror or e}): pick another") from None


def write(path, text, fix):
    """Write `text` (str, or bytes) to `path` whole: a temporary beside it, then renamed over it (a link at `path` is
    replaced, not written through). On failure the temporary is removed and a UserError names the file, the cause
    and `fix`."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") if isinstance(text, bytes) else open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a disk turned read-only, a folder where the file goes
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise config.UserError(f"cannot write {path}: {e.strerror or e}; {fix}") from None
