"""The sample sheet a person looks at."""

from __future__ import annotations

from PIL import Image

from ccm_world.grid import save_sample_grid


def test_sample_grid_is_written_small(tmp_path):
    path = save_sample_grid(tmp_path / "grid.png", rows=3, size=32)
    image = Image.open(path)
    assert image.width > 400 and image.height > 200
    assert path.stat().st_size < 200_000
