"""Where the project's shipped files live (conf/, data/), whatever the working directory.

cpe-ray is installed editable or shipped whole with `ray job submit --working-dir .`, so
the repository root is the parent of this package; relative paths a user passes are tried
against the working directory first and the repository root second.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
PROMPTS_DIR = CONF_DIR / "prompts"
DATA_DIR = REPO_ROOT / "data"


def resolve_path(path: str | Path) -> Path:
    """Return `path` as given if it exists (or is absolute), else relative to the repo root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    candidate = REPO_ROOT / p
    return candidate if candidate.exists() else p


HASH_CHUNK_BYTES = 4 * 1024**2  # bounds the memory of hashing a multi-GB file


def sha256_file(path: Path) -> str:
    """The file's sha256 hex digest, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
