"""The artifact layer: atomic writes, checked reads and rebuild hints.

Every file the library writes goes through :func:`atomic_write` (a temporary name beside the
target, then a rename), so an interrupted run leaves either the old file or the new one, never a
half-written one. Every JSON or safetensors file it reads goes through :func:`read_json` or
:func:`read_safetensors`, which turn a missing, truncated or malformed file into the caller's
:class:`~core.errors.PrismError` subclass naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from core.errors import ArtifactError, PrismError

MAX_HASHED_BYTES = 64 * 2**30  # no artifact the library writes comes near this


def rebuild_hint(bundle_dir: str | Path, corpus: str | Path = "PATH") -> str:
    """The command that rebuilds a bundle's index and everything derived from it."""
    return f"`prism index --model {bundle_dir} --corpus {corpus}`"


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the bundle's other files are readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, payload: object, indent: int | None = None) -> Path:
    """Atomically write ``payload`` as UTF-8 JSON."""
    return atomic_write(path, json.dumps(payload, ensure_ascii=False, indent=indent))


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Atomically write one JSON object per line."""
    return atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_safetensors(path: str | Path, arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> Path:
    """Atomically write numpy arrays as a safetensors file."""
    from safetensors.numpy import save

    return atomic_write(path, save(arrays, metadata=metadata))


def parse_json(
    text: str | bytes, where: str, fix: str | None = None, error: type[PrismError] = ArtifactError
) -> object:
    """``json.loads`` that raises ``error`` naming ``where`` on any malformed document.

    Besides bad syntax this covers what ``json`` raises other exceptions for: nesting deeper
    than the interpreter's recursion limit (RecursionError) and integers of more than
    ``sys.get_int_max_str_digits()`` digits (ValueError).

    Args:
        text: the JSON text.
        where: the document, for the message ("the index metadata x/meta.json", "tasks.jsonl line 4").
        fix: the sentence that fixes it.
        error: the PrismError subclass to raise.
    """
    tail = f"; {fix}" if fix else ""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{where} is not valid JSON ({err}){tail}") from None
    except RecursionError:
        raise error(f"{where} is nested too deeply to be valid JSON{tail}") from None
    except ValueError as err:  # an integer longer than sys.get_int_max_str_digits()
        raise error(f"{where} holds a number too long to read ({str(err).split(';')[0]}){tail}") from None


def read_json(
    path: str | Path, what: str = "file", fix: str | None = None, error: type[PrismError] = ArtifactError
) -> object:
    """Parse a JSON file, raising ``error`` that names the file and the fix on any failure.

    Args:
        path: the file.
        what: what the file is, for the message ("the index metadata").
        fix: the sentence that fixes it ("rebuild it with `prism index ...`").
        error: the PrismError subclass to raise.
    """
    path = Path(path)
    tail = f"; {fix}" if fix else ""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} {path} not found{tail}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{what} {path} cannot be read ({err}){tail}") from None
    return parse_json(text, f"{what} {path}", fix, error)


def read_safetensors(
    path: str | Path, what: str = "file", fix: str | None = None, error: type[PrismError] = ArtifactError
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Load a safetensors file as numpy arrays and its metadata, raising ``error`` on any failure."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    tail = f"; {fix}" if fix else ""
    if not path.is_file():
        raise error(f"{what} {path} not found{tail}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            arrays = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise error(f"{what} {path} is not a readable safetensors file ({err}){tail}") from None
    return arrays, metadata


def check_output(path: str | Path, what: str, error: type[PrismError]) -> Path:
    """Refuse an output file that could not be written, before any work is done.

    Args:
        path: the file to be written (it may exist: it will be replaced).
        what: the option or artifact, for the message ("--out").
        error: the PrismError subclass to raise.
    """
    p = Path(path)
    if p.is_dir():
        raise error(f"{what} {p} is a folder; give a file name inside it")
    parent = p.parent
    if not parent.is_dir():
        raise error(f"{what} {p}: folder {parent} does not exist; create it or choose another {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"{what} {p}: folder {parent} is not writable; choose another {what}")
    return p


def sha256_file(path: str | Path, digest: hashlib._Hash | None = None, max_bytes: int = MAX_HASHED_BYTES) -> str:
    """The sha256 of a regular file, read in blocks (``digest`` is updated when given).

    Raises:
        ArtifactError: ``path`` is not a regular file (a device, a folder or a dangling link)
            or is larger than ``max_bytes``.
    """
    p = Path(path)
    if not p.is_file():  # follows links: a link to /dev/zero is not a regular file
        raise ArtifactError(f"{p} is not a regular file")
    if p.stat().st_size > max_bytes:
        raise ArtifactError(f"{p} is larger than {max_bytes / 2**30:g} GiB")
    digest = digest if digest is not None else hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns:
        False where the system or the filesystem cannot do it (nothing was changed).
    """
    import ctypes
    import errno
    import sys

    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # glibc before 2.28, or another libc
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_folder(src: str | Path, dst: str | Path) -> None:
    """Make the complete folder ``src`` the folder ``dst``, replacing a previous ``dst`` whole.

    Where ``dst`` exists the two are exchanged in one atomic rename (Linux), so a reader or an
    interruption sees either the whole previous folder or the whole new one; the previous one
    is then deleted. Elsewhere the previous folder is renamed aside, ``src`` renamed in, and the
    previous one put back if that second rename fails or is interrupted.
    """
    import shutil

    src, dst = Path(src), Path(dst)
    if not dst.exists():
        os.replace(src, dst)
        return
    if _exchange(src, dst):
        shutil.rmtree(src, ignore_errors=True)  # src now holds the previous folder
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{dst.name}-old-", dir=dst.parent))
    try:
        os.replace(dst, aside / dst.name)
        try:
            os.replace(src, dst)
        except BaseException:
            os.replace(aside / dst.name, dst)  # put the previous folder back
            raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)
