"""Writing files the way a user's tools expect: modes from the umask, and replacements that a kill at
any moment leaves whole (the old file or the new one, never a cut one)."""
import contextlib
import os
import tempfile
from pathlib import Path


def umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it
    os.umask(mask)
    return mask


def replace_file(path: Path, text: str) -> None:
    """Write path's new text through a temporary file in its directory, fsynced before the rename. The
    file keeps its mode, or gets open()'s under the umask when new (not mkstemp's 0600: others may read
    a run's files)."""
    path = Path(path)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            os.chmod(tmp, mode)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
