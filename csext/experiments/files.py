"""Files written whole or not at all."""

import os
import secrets
from pathlib import Path


def write_atomic(path, content) -> None:
    """Write `content` (bytes, or a function that writes into a binary file) to `path` through a
    temporary file in the same folder, then rename it over `path`: a reader, or a run killed
    midway, never sees half a file. The file gets the permissions open() would give it (the
    umask's), where tempfile.mkstemp would make it readable by its owner alone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        with open(tmp, "xb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
