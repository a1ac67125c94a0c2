"""Writing matplotlib figures the same way everywhere in ``ccm_sdk.eval``."""

from __future__ import annotations

import os
from pathlib import Path


def save_figure(figure, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure at 100 dpi."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, **savefig_kwargs)
    plt.close(figure)
    return path
