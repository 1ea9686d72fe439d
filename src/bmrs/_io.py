"""Atomic file writing (a temporary file beside the target, then a rename), and reading JSON.

Every file bmrs writes goes through :func:`write_atomic`, so an interrupted process never
leaves a half-written result (at worst a hidden ``.*.tmp`` file beside it).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import BMRSError

__all__ = [
    "content_digest", "read_json", "read_tensors", "state_checksum", "write_atomic", "write_bytes", "write_json", "write_text",
]

_MODE: int | None = None


def _file_mode() -> int:
    """The mode ``open()`` would give a new file (0o666 less the umask); ``mkstemp`` gives 0o600."""
    global _MODE
    if _MODE is None:
        mask = os.umask(0o022)
        os.umask(mask)
        _MODE = 0o666 & ~mask
    return _MODE


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(temporary_path)``, give the file the usual permissions and rename it to
    ``path``; on any failure the temporary file is removed and ``path`` is untouched.

    A failure to write (a full disk, a read-only directory, a name too long) raises
    ``OSError`` whose message names ``path``: ``torch.save`` reports a full disk as a
    ``RuntimeError`` about stream positions, which is turned into one too.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from None
        if isinstance(err, RuntimeError) and ("unexpected pos" in str(err) or "write" in str(err).lower()):
            detail = " ".join(str(err).split())[:160]
            raise OSError(f"cannot write {path} (is the disk full?): {detail}") from None
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) atomically."""
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` atomically."""
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def write_json(data, path: str | os.PathLike) -> None:
    """Write ``data`` as indented, key-sorted, strict JSON atomically: a NaN or infinity is
    refused (``ValueError`` naming ``path``), never written as a literal other readers reject."""
    try:
        text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False)
    except ValueError as err:
        raise BMRSError(f"{path}: not written, the data holds a non-finite number ({err})") from None
    write_text(path, text + "\n")


def read_tensors(path: str | os.PathLike, what: str = "a file written by bmrs"):
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only, no code
    runs. Anything that is not such a file (truncated, foreign, crafted) raises a one-line
    ``ValueError`` naming ``path`` and saying it is not ``what``."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise OSError(err.errno, f"{path}: {err.strerror or err}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, UnicodeDecodeError, OverflowError, MemoryError) as err:
        text = " ".join(str(err).split())
        if "Weights only load failed" in text or "Unsupported operand" in text or "Unsupported global" in text:
            text = "it holds objects other than tensors and plain containers"
        raise BMRSError(f"{path} is not {what} ({text[:200]})") from None


def _tensor_bytes(tensor) -> bytes:
    """A tensor's contents as bytes, whatever its device, layout or gradient."""
    import torch

    t = tensor.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def content_digest(obj) -> str:
    """SHA-256 of what ``obj`` holds: tensors (dtype, shape and bytes), numbers, strings and
    the dicts, lists and tuples around them, in a fixed order. The same contents give the same
    digest however ``torch.save`` lays a file out, so a file can carry the digest of the rest
    of its contents and be checked when it is read back (a training checkpoint does)."""
    import hashlib

    import torch

    digest = hashlib.sha256()

    def feed(x) -> None:
        if isinstance(x, torch.Tensor):
            digest.update(f"T{x.dtype}{tuple(x.shape)}|".encode())
            digest.update(_tensor_bytes(x))
        elif isinstance(x, dict):
            digest.update(f"D{len(x)}|".encode())
            for key in sorted(x, key=repr):
                feed(key)
                feed(x[key])
        elif isinstance(x, (list, tuple)):
            digest.update(f"L{len(x)}|".encode())
            for item in x:
                feed(item)
        else:
            digest.update(f"{type(x).__name__}:{x!r}|".encode())

    feed(obj)
    return digest.hexdigest()


def state_checksum(state: dict) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and contents, as a run's
    ``metrics.json`` records it for ``model.pt`` and ``compact.pt`` (a flat mapping of names
    to tensors; kept in this form, older than :func:`content_digest`, so that the runs already
    written still check)."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def read_json(path: str | os.PathLike) -> dict:
    """A JSON file holding an object; a clear ``ValueError`` when it is not valid JSON or
    not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise BMRSError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    except UnicodeDecodeError:
        raise BMRSError(f"{path} is not valid JSON (not UTF-8 text)") from None
    if not isinstance(data, dict):
        raise BMRSError(f"{path} does not hold a JSON object")
    return data
