"""Whole-index writes: everything ``prism index`` or ``prism label`` writes into a bundle's
``index/`` is built in a staging copy and swapped in with one rename.

The staging copy is a hidden sibling of the bundle (``.NAME.index-staging-*``; inside the
bundle when its parent is not writable) that holds links to the bundle's own files (config,
weights, tokenizer, training.json: the same bytes, so the same model fingerprint) and an
``index/`` of its own. A sibling sits at the bundle's depth, so a path recorded relative to the
bundle (the influence factors record their corpus so) is the same from both. The builders (neighbourhoods, spans,
labels, atlas, influence) are pointed at it as if it were the bundle; only when all of them
have finished is its ``index/`` exchanged with the bundle's (:func:`core.store.replace_folder`).
An interruption or an error at any step leaves the previous index as it was, byte for byte,
and removes the staging folder.

Under ``torchrun`` rank 0 alone makes the staging copy and swaps it in; the other ranks are
handed its path (:func:`shared_staged_index`) and build their shares of the passes there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from core import distributed
from core.errors import PrismError, PrototypeIndexError
from core.index.format import INDEX_DIR, index_dir
from core.store import replace_folder

STAGING_MARK = ".index-staging-"


def check_bundle_writable(bundle_dir: str | Path) -> Path:
    """Refuse a bundle folder whose index could not be written, before any work is done.

    Raises:
        PrototypeIndexError: the folder is missing, not a folder or not writable.
    """
    p = Path(bundle_dir)
    if not p.is_dir():
        raise PrototypeIndexError(f"model folder not found: {p}")
    if not os.access(p, os.W_OK | os.X_OK):
        raise PrototypeIndexError(f"the bundle folder {p} is not writable: its index cannot be written there")
    final = index_dir(p)
    if final.exists() and not final.is_dir():
        raise PrototypeIndexError(f"{final} is a file, not an index folder; move it away and rerun")
    return p


def _link(src: Path, dst: Path) -> None:
    """``dst`` becomes the same file as ``src`` (a hard link; a symbolic one where links fail)."""
    try:
        os.link(src, dst)
    except OSError:
        os.symlink(src.resolve(), dst)


@contextlib.contextmanager
def staged_index(bundle_dir: str | Path, keep_index: bool) -> Iterator[Path]:
    """A staging copy of the bundle to build index files in; its index replaces the bundle's
    when the block ends without an error.

    Args:
        bundle_dir: the bundle.
        keep_index: start from the bundle's current index files (``prism label`` adds labels
            and the atlas to them); False starts from no index (``prism index`` builds it all).

    Yields:
        the staging bundle folder, to pass to the builders in place of ``bundle_dir``.

    Raises:
        PrototypeIndexError: the bundle folder cannot hold an index (see
            :func:`check_bundle_writable`).
    """
    bundle = check_bundle_writable(bundle_dir).resolve()
    parent = bundle.parent
    if os.access(parent, os.W_OK | os.X_OK):
        staging = Path(tempfile.mkdtemp(prefix=f".{bundle.name}{STAGING_MARK}", dir=parent))
    else:
        staging = Path(tempfile.mkdtemp(prefix=STAGING_MARK, dir=bundle))
    try:
        for entry in sorted(bundle.iterdir()):
            if entry.is_file() and not entry.name.startswith("."):
                _link(entry, staging / entry.name)
        current = index_dir(bundle)
        if keep_index and current.is_dir():
            (staging / INDEX_DIR).mkdir()
            for entry in sorted(current.iterdir()):
                if entry.is_file():
                    _link(entry, staging / INDEX_DIR / entry.name)  # rewritten files are replaced, not edited
        try:
            yield staging
        except PrismError as err:  # name the bundle, not its staging copy
            raise type(err)(str(err).replace(str(staging), str(bundle_dir))) from None
        built = index_dir(staging)
        if not built.is_dir():
            raise PrototypeIndexError(f"no index was built in {staging}")
        os.chmod(built, 0o755)  # mkdtemp made it private; a bundle's folders are readable
        replace_folder(built, current)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def shared_staged_index(bundle_dir: str | Path, keep_index: bool) -> Iterator[Path]:
    """:func:`staged_index` for every rank: rank 0 makes the staging copy (and swaps its index
    in at the end) and sends its path to the other ranks, whose block runs in the same folder
    and whose exit does nothing. Alone, :func:`staged_index` itself."""
    if distributed.is_main():
        with staged_index(bundle_dir, keep_index) as staging:
            distributed.broadcast_object(str(staging))
            yield staging
    else:
        staging = Path(distributed.broadcast_object(None))
        try:
            yield staging
        except PrismError as err:  # name the bundle, not its staging copy
            raise type(err)(str(err).replace(str(staging), str(bundle_dir))) from None
