"""Models already downloaded by the Hugging Face and Kaggle hub clients, found without the clients.

* Hugging Face (``huggingface_hub``, ``hf download``, transformers): ``$HF_HUB_CACHE`` (else
  ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``)
  holds ``models--<owner>--<name>/`` with ``refs/<branch>`` (a file naming a commit) and
  ``snapshots/<commit>/`` (the repository's files, as links into ``blobs/``).
* Kaggle (``kagglehub``, KerasHub's presets): ``$KAGGLEHUB_CACHE`` (else ``~/.cache/kagglehub``)
  holds ``models/<owner>/<model>/<framework>/<variation>/<version>/``.

Only names made of letters, digits and ``-_.`` are looked up, so a name cannot lead outside the
cache; nothing is downloaded here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def _safe(*parts: str) -> bool:
    return all(isinstance(p, str) and _PART.match(p) and ".." not in p for p in parts)


def hf_cache_dir() -> Path:
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return xdg / "huggingface" / "hub"


def kaggle_cache_dir() -> Path:
    if os.environ.get("KAGGLEHUB_CACHE"):
        return Path(os.environ["KAGGLEHUB_CACHE"]).expanduser()
    return Path.home() / ".cache" / "kagglehub"


def find_hf(repo_id: str, revision: str = "main") -> Path | None:
    """The cached snapshot directory of ``owner/name`` at ``revision`` (a branch, tag or commit),
    or None.  Without a ``refs/<revision>`` file, a repository with a single snapshot gives it."""
    owner, _, name = repo_id.partition("/")
    if not _safe(owner, name) or not _safe(revision) or "/" in name:
        return None
    repo = hf_cache_dir() / f"models--{owner}--{name}"
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    commit = revision if _COMMIT.match(revision) else None
    ref = repo / "refs" / revision
    if commit is None and ref.is_file():
        text = ref.read_text(encoding="ascii", errors="replace")[:100].strip()
        commit = text if _COMMIT.match(text) else None
    if commit is None:
        found = [p for p in snapshots.iterdir() if p.is_dir() and _COMMIT.match(p.name)]
        if len(found) != 1 or revision != "main":
            return None
        return found[0]
    where = snapshots / commit
    return where if where.is_dir() else None


def find_kaggle(handle: str) -> Path | None:
    """The cached directory of ``owner/model/framework/variation[/version]`` (latest version when
    none is given), or None."""
    parts = handle.strip("/").split("/")
    if len(parts) not in (4, 5) or not _safe(*parts):
        return None
    base = kaggle_cache_dir() / "models" / "/".join(parts[:4])
    if len(parts) == 5:
        return base / parts[4] if (base / parts[4]).is_dir() else None
    if not base.is_dir():
        return None
    versions = [p for p in base.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(versions, key=lambda p: int(p.name)) if versions else None
