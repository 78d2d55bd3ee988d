"""Files written whole or not at all."""

import os
import tempfile
from pathlib import Path


def write_atomic(path, content) -> None:
    """Write `content` (bytes, or a function that writes into a binary file) to `path` through a
    temporary file in the same folder, then rename it over `path`: a reader, or a run killed
    midway, never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
