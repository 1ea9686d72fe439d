"""Atomic file writing (a temporary file beside the target, then a rename), and reading JSON (every JSON
file bmrs reads goes through :func:`read_json`, checked against a schema of its kind).

Every file bmrs writes goes through :func:`write_atomic`, so an interrupted process never
leaves a half-written result (at worst a hidden ``.*.tmp`` file beside it).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import BMRSError

__all__ = [
    "ANY", "Mapping", "Nullable", "Number", "OptionalKey", "check_json", "content_digest", "parse_json", "read_json", "read_tensors", "state_checksum", "write_atomic", "write_bytes", "write_json", "write_text",
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
    ``path``; on any failure the temporary file (and any folder made for it) is removed and ``path``
    is untouched.

    A failure to write (a full disk, a read-only directory, a name too long) raises
    ``OSError`` whose message names ``path``: ``torch.save`` reports a full disk as a
    ``RuntimeError`` about stream positions, which is turned into one too.
    """
    path = Path(path)
    tmp = None
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
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
        for folder in created:  # nor the folders made for it
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
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
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # PyTorch's remarks on the pickle protocol would stand before ours
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
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


# Bounds of a JSON file bmrs reads: far above what bmrs writes (a large sweep is a few MB, its
# nesting 5 deep), far below what could exhaust memory or the parser's recursion.
MAX_JSON_BYTES = 64 * 2**20
MAX_JSON_DEPTH = 32


class Number:
    """A JSON number in ``[low, high]`` (an integer with ``integer``); booleans are not numbers."""

    def __init__(self, low: float = -math.inf, high: float = math.inf, *, integer: bool = False):
        self.low, self.high, self.integer = low, high, integer

    def __repr__(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low > -math.inf and self.high < math.inf:
            return f"{kind} in [{self.low:g}, {self.high:g}]"
        return f"{kind} >= {self.low:g}" if self.low > -math.inf else f"{kind} <= {self.high:g}" if self.high < math.inf else kind


class Nullable:
    """``spec`` or null."""

    def __init__(self, spec):
        self.spec = spec

    def __repr__(self) -> str:
        return f"{_describe(self.spec)} or null"


class OptionalKey:
    """A key of an object that may be missing; when present, its value is ``spec``."""

    def __init__(self, spec):
        self.spec = spec


class Mapping:
    """An object of any keys whose values are ``spec``."""

    def __init__(self, spec):
        self.spec = spec

    def __repr__(self) -> str:
        return f"an object of {_describe(self.spec)} values"


ANY = object()  # any JSON value (still finite and bounded)
_NAMES = {str: "a string", bool: "true or false", dict: "an object", list: "a list"}


def _describe(spec) -> str:
    if isinstance(spec, dict):
        return "an object"
    if isinstance(spec, list):
        return "a list"
    return _NAMES.get(spec) or repr(spec)


def check_json(value, spec, source, where: str = ""):
    """``value`` if it has the shape ``spec`` describes, else a ``BMRSError`` naming ``source``
    and the field. A spec is ``str``, ``bool``, ``dict`` (any object), ``list`` (any list),
    :data:`ANY`, a :class:`Number`, :class:`Nullable` or :class:`Mapping`, ``[item spec]`` (a
    list of such items) or ``{key: spec}`` (an object with these keys, others allowed; a key
    whose spec is :class:`OptionalKey` may be missing)."""

    def fail():
        shown = json.dumps(value)[:60] if value is not None else "null"
        raise BMRSError(f"{source}: {where or 'the file'} must be {_describe(spec)}, got {shown}")

    if spec is ANY:
        return value
    if isinstance(spec, Nullable):
        return None if value is None else check_json(value, spec.spec, source, where)
    if isinstance(spec, Number):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (spec.integer and not isinstance(value, int)):
            fail()
        if not spec.low <= value <= spec.high:
            fail()
        return value
    if spec in (str, bool):
        if not isinstance(value, spec):
            fail()
        return value
    if spec is dict or isinstance(spec, (dict, Mapping)):
        if not isinstance(value, dict):
            fail()
    if spec is list or isinstance(spec, list):
        if not isinstance(value, list):
            fail()
    if isinstance(spec, Mapping):
        for key, item in value.items():
            check_json(item, spec.spec, source, f"{where}.{key}" if where else str(key))
    elif isinstance(spec, list) and spec:
        for i, item in enumerate(value):
            check_json(item, spec[0], source, f"{where}[{i}]")
    elif isinstance(spec, dict):
        for key, field in spec.items():
            name = f"{where}.{key}" if where else key
            optional = isinstance(field, OptionalKey)
            if key not in value:
                if optional:
                    continue
                raise BMRSError(f"{source}: no {name!r}")
            check_json(value[key], field.spec if optional else field, source, name)
    return value


def _refuse_constant(name: str):
    raise ValueError(f"the non-finite number {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is beyond the range of a double")
    return value


def _depth(value) -> int:
    """The nesting depth of a parsed JSON value (iteratively: no recursion limit to meet)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json(text: str | bytes, source, spec=dict):
    """The JSON document ``text`` (read from ``source``), checked: at most
    :data:`MAX_JSON_BYTES` long and :data:`MAX_JSON_DEPTH` deep, every number finite (no
    ``NaN`` or ``Infinity`` literal, no ``1e400``), and of the shape ``spec`` (see
    :func:`check_json`; by default, any object). Every failure is a ``BMRSError`` naming
    ``source`` (and the field)."""
    if len(text) > MAX_JSON_BYTES:
        raise BMRSError(f"{source} is not a JSON file bmrs wrote: over {MAX_JSON_BYTES // 2**20} MiB")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise BMRSError(f"{source} is not valid JSON (not UTF-8 text)") from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as err:
        raise BMRSError(f"{source} is not valid JSON ({err.msg} at line {err.lineno})") from None
    except RecursionError:
        raise BMRSError(f"{source} is not a JSON file bmrs wrote: nested over {MAX_JSON_DEPTH} deep") from None
    except ValueError as err:  # a refused number, or an integer of over 4300 digits
        raise BMRSError(f"{source} is not a JSON file bmrs wrote: {' '.join(str(err).split())[:120]}") from None
    if _depth(data) > MAX_JSON_DEPTH:
        raise BMRSError(f"{source} is not a JSON file bmrs wrote: nested over {MAX_JSON_DEPTH} deep")
    return check_json(data, spec, source)


def read_json(path: str | os.PathLike, spec=dict):
    """The JSON file ``path``, checked as :func:`parse_json` checks a document (by default:
    any object). Every JSON file bmrs reads is read here."""
    path = Path(path)
    with open(path, "rb") as f:
        text = f.read(MAX_JSON_BYTES + 1)
    return parse_json(text, path, spec)
