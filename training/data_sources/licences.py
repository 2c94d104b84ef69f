"""Per-file licence resolution: PyPI package metadata, Debian machine-readable copyright files,
KDE wallpaper metadata and scikit-image's per-sample notes."""

from __future__ import annotations

import fnmatch
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .catalog import SKIMAGE_LICENCES, Source

__all__ = ["Dep5Stanza", "parse_dep5", "dep5_lookup", "wheel_licence", "resolve_licence"]


@dataclass(frozen=True)
class Dep5Stanza:
    """One ``Files:`` paragraph of a Debian copyright file."""

    patterns: tuple[str, ...]
    copyright: str
    licence: str


def parse_dep5(text: str) -> list[Dep5Stanza]:
    """Parse the ``Files:`` paragraphs of a DEP-5 (machine-readable) ``copyright`` file."""
    stanzas: list[Dep5Stanza] = []
    for para in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        current = None
        for line in para.splitlines():
            if line[:1] in (" ", "\t") and current is not None:
                fields[current] += "\n" + line.strip()
            elif ":" in line:
                current, _, value = line.partition(":")
                current = current.strip()
                fields[current] = value.strip()
        if "Files" in fields:
            patterns = tuple(fields["Files"].split())
            lic = fields.get("License", "").splitlines()[0].strip() if fields.get("License") else ""
            stanzas.append(Dep5Stanza(patterns, " ".join(fields.get("Copyright", "").split()), lic))
    return stanzas


def dep5_lookup(stanzas: list[Dep5Stanza], member: str) -> Dep5Stanza | None:
    """The stanza that governs ``member`` (last match wins, as DEP-5 specifies).

    Debian installs files under other paths than the upstream tree the copyright file describes,
    so a pattern matches when it matches the end of the installed path or its file name.
    """
    found = None
    name = PurePosixPath(member).name
    for st in stanzas:
        for pat in st.patterns:
            if (
                pat == "*"
                or fnmatch.fnmatch(member, "*" + pat)
                or ("/" in pat and fnmatch.fnmatch(name, PurePosixPath(pat).name))
            ):
                if pat.startswith("debian/"):
                    continue
                found = st
                break
    return found


def wheel_licence(wheel: Path) -> str:
    """Licence of a wheel from its METADATA (``License-Expression``, ``License`` or classifiers)."""
    with zipfile.ZipFile(wheel) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = zf.read(meta_name).decode("utf-8", "replace")
    header = meta.split("\n\n", 1)[0]
    for key in ("License-Expression", "License"):
        m = re.search(rf"^{key}: (.+)$", header, re.M)
        if m and m.group(1).strip() and len(m.group(1)) < 60 and "Files:" not in m.group(1):
            return m.group(1).strip()
    classifiers = re.findall(r"^Classifier: License :: (?:OSI Approved :: )?(.+)$", header, re.M)
    if classifiers:
        names = {"BSD License": "BSD-3-Clause", "MIT License": "MIT"}
        return names.get(classifiers[0].strip(), classifiers[0].strip())
    return ""


def resolve_licence(source: Source, member: str, root: Path) -> tuple[str, str]:
    """``(licence, copyright/attribution)`` of one member.

    ``root`` is the wheel path (PyPI) or the unpacked Debian package directory.
    """
    if member in SKIMAGE_LICENCES:
        lic, who = SKIMAGE_LICENCES[member]
        return lic, who
    if source.registry == "pypi":
        lic = source.licence or wheel_licence(root)
        return lic, source.attribution
    copyright_file = root / "usr" / "share" / "doc" / source.package / "copyright"
    deb_lic, deb_copy = "", ""
    if copyright_file.is_file():
        st = dep5_lookup(parse_dep5(copyright_file.read_text("utf-8", "replace")), member)
        if st is not None:
            deb_lic, deb_copy = st.licence, st.copyright
    parts = PurePosixPath(member).parts
    if "wallpapers" in parts and "contents" in parts:
        meta = root.joinpath(*parts[: parts.index("contents")]) / "metadata.json"
        if meta.is_file():
            plugin = json.loads(meta.read_text("utf-8")).get("KPlugin", {})
            authors = ", ".join(a.get("Name", "") for a in plugin.get("Authors", []))
            lic = plugin.get("License", "")
            if lic:
                return (f"{lic} (wallpaper metadata.json; Debian copyright says {deb_lic or 'n/a'})", authors)
    return deb_lic or (source.licence or ""), deb_copy or source.attribution
