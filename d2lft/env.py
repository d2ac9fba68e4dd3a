"""The one place where d2lft reads the environment.

Everything else receives paths and flags as arguments; only the defaults come from here.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["data_dir", "offline"]

_REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir(*, use_environment: bool = True) -> Path:
    """Where datasets live: ``$D2LFT_DATA_DIR`` if set, else the repository's ``data/`` folder.

    >>> isinstance(data_dir(), Path)
    True
    """
    value = os.environ.get("D2LFT_DATA_DIR") if use_environment else None
    if value:
        path = Path(value).expanduser()
        # Notebooks run in book/, tests in the repository root: a relative setting such as
        # ../shared/data is taken from the current directory, else from the repository root.
        if not path.is_absolute() and not path.exists() and (_REPO_ROOT / path).exists():
            path = _REPO_ROOT / path
        return path.resolve()
    if (_REPO_ROOT / "pyproject.toml").exists():  # an editable install inside the course repository
        return _REPO_ROOT / "data"
    return Path.home() / ".d2lft" / "data"


def offline() -> bool:
    """True when ``$D2LFT_OFFLINE`` asks d2lft never to touch the network.

    >>> offline() in (True, False)
    True
    """
    return os.environ.get("D2LFT_OFFLINE", "").strip().lower() in {"1", "true", "yes"}
