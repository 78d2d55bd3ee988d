"""Files written whole or not at all, and read back verified."""

import hashlib
import os
import pickle
import secrets
from pathlib import Path

import torch


class WriteError(OSError):
    """A file of a run could not be written (a full disk, a folder gone read-only); the files
    written before it are whole."""


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
    except BaseException as error:
        if tmp.exists():
            tmp.unlink()
        if isinstance(error, OSError) and not isinstance(error, WriteError):
            raise WriteError(error.errno, error.strerror or str(error), str(path)) from None
        raise


def check_output_folder(path, option: str = "--out") -> Path:
    """`path` as a folder the run can write in, made if missing; else FileError, in one line.
    Tried by writing a file there (and removing it): permissions alone do not say it for root,
    nor for /proc."""
    if not str(path).strip():
        raise FileError(f"{option} must name a folder, got {str(path)!r}")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise FileError(f"{option} {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test.{secrets.token_hex(6)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise FileError(f"{option} {folder} cannot be written ({error.strerror or error})") from None
    return folder


class FileError(ValueError):
    """A file a run reads cannot be used: missing, damaged, or not what it should be. The
    message is one line naming the file."""


CHECKSUM = "sha256"


def content_sha256(obj) -> str:
    """SHA-256 of what a saved dict holds (tensors by dtype, shape and bytes; dicts, lists and
    plain values by type and value), the same before saving and after loading."""
    digest = hashlib.sha256()

    def feed(value) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
        elif isinstance(value, dict):
            digest.update(f"D{len(value)}:".encode())
            for key, item in value.items():
                feed(key)
                feed(item)
        elif isinstance(value, (list, tuple)):
            digest.update(f"{type(value).__name__[0]}{len(value)}:".encode())
            for item in value:
                feed(item)
        elif value is None or isinstance(value, (bool, int, float, str, bytes, torch.dtype, torch.device)):
            digest.update(f"{type(value).__name__}:{value!r};".encode())
        else:
            raise TypeError(f"cannot checksum a {type(value).__name__}")

    feed(obj)
    return digest.hexdigest()


def save_checked(path, obj: dict) -> None:
    """torch.save `obj` to `path` atomically, with the checksum of its content (load_checked)."""
    write_atomic(path, lambda f: torch.save({**obj, CHECKSUM: content_sha256(obj)}, f))


def load_checked(path) -> dict:
    """The dict that save_checked wrote to `path`, its checksum verified. Tensors only and plain
    values (weights_only): a file is data, never code. Raises FileError, in a line saying why."""
    path = Path(path)
    if not path.is_file():
        raise FileError(f"{path} does not exist")
    if path.stat().st_size == 0:
        raise FileError(f"{path} is empty (a write that never finished, or a disk that filled up)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused an object csext never writes
        raise FileError(f"{path} holds Python objects other than tensors and plain values; csext never writes "
                        f"them and will not load them") from None
    except Exception:  # truncated, or another kind of file
        raise FileError(f"{path} is damaged or not a file torch.save wrote (truncated, or another format)") from None
    if not isinstance(obj, dict):
        raise FileError(f"{path} holds a {type(obj).__name__}, not the dict csext writes")
    saved = obj.pop(CHECKSUM, None)
    if saved is None:
        raise FileError(f"{path} has no checksum: it was not written by this version of csext")
    try:
        matches = saved == content_sha256(obj)
    except TypeError as error:
        raise FileError(f"{path} holds what csext never writes ({error})") from None
    if not matches:
        raise FileError(f"{path} is damaged: its content does not match its checksum")
    return obj
