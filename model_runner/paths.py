"""Where jitney keeps what it makes once and reuses: converted models, the tiny random model, built kernels."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("JITNEY_CACHE_DIR") or Path.home() / ".cache" / "jitney")
