"""Writing files so that a crash never leaves half of one: a temporary file beside the target, flushed to disk,
then renamed over it (a rename within a folder is atomic). And the checksums that let a resume trust what
an earlier process wrote."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Replace `path` by `data` in one step: readers see the old file or the new one, never a torn one."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.partial")
    with open(temporary, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    sync_folder(path.parent)


def sync_folder(folder: str | Path) -> None:
    """Make a rename in `folder` durable (POSIX: the directory entry itself must be flushed)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksums(folder: str | Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under `folder` (relative paths), except the names in `skip`."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): sha256_of(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in skip}


def damage(folder: str | Path, expected: dict[str, str]) -> str | None:
    """What differs from the recorded checksums (a missing or changed file), or None."""
    folder = Path(folder)
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_of(path) != digest:
            return f"{name} does not match its checksum"
    return None
