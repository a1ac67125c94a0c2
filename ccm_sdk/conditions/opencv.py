"""Tensor <-> OpenCV uint8 conversions and binary-image helpers shared by the OpenCV conditions."""

from __future__ import annotations

import cv2
import numpy as np
import torch


def to_uint8_rgb(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] float in [0, 1] -> uint8 array [B, H, W, 3] (rounded, as PIL would store it)."""
    array = images.detach().float().permute(0, 2, 3, 1).cpu().numpy()
    # in-place numpy passes: several times faster than the same steps as torch ops on a CPU
    scaled = np.multiply(array, 255.0, dtype=np.float32)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    np.rint(scaled, out=scaled)
    return scaled.astype(np.uint8)


def maps_to_tensor(maps: list[np.ndarray], *, device: torch.device | str = "cpu", channels: int = 3) -> torch.Tensor:
    """Single-channel uint8 maps [H, W] (0 or 255 for binary ones) -> float [B, channels, H, W] in [0, 1]."""
    stacked = torch.from_numpy(np.stack(maps))[:, None].float().div_(255.0)
    return stacked.expand(-1, channels, -1, -1).contiguous().to(device)


def _guo_hall_tables() -> tuple[np.ndarray, np.ndarray]:
    # Neighbour bits: 1=N, 2=NE, 4=E, 8=SE, 16=S, 32=SW, 64=W, 128=NW.
    codes = np.arange(256)
    n, ne, e, se, s, sw, w, nw = ((codes >> bit) & 1 for bit in range(8))
    connectivity = ((1 - n) & (ne | e)) + ((1 - e) & (se | s)) + ((1 - s) & (sw | w)) + ((1 - w) & (nw | n))
    n1 = (nw | n) + (ne | e) + (se | s) + (sw | w)
    n2 = (n | ne) + (e | se) + (s | sw) + (w | nw)
    count = np.minimum(n1, n2)
    deletable = (connectivity == 1) & (count >= 2) & (count <= 3)
    # Sub-iteration order as in scikit-image's ``thin``, so both give the same skeleton.
    first = deletable & (((n | ne | (1 - se)) & e) == 0)
    second = deletable & (((s | sw | (1 - nw)) & w) == 0)
    return first, second


_GUO_HALL_FIRST, _GUO_HALL_SECOND = _guo_hall_tables()


def _neighbour_codes(padded: np.ndarray) -> np.ndarray:
    h, w = padded.shape[0] - 2, padded.shape[1] - 2
    offsets = ((0, 1), (0, 2), (1, 2), (2, 2), (2, 1), (2, 0), (1, 0), (0, 0))  # N, NE, E, SE, S, SW, W, NW
    code = np.zeros((h, w), dtype=np.uint8)
    for bit, (dy, dx) in enumerate(offsets):
        code |= padded[dy : dy + h, dx : dx + w] << bit
    return code


def thin(binary: np.ndarray, max_iterations: int | None = None) -> np.ndarray:
    """Guo-Hall parallel thinning of a 2-D binary image down to 1-pixel-wide, 8-connected lines."""
    padded = np.pad(np.asarray(binary, dtype=bool).astype(np.uint8), 1)
    core = padded[1:-1, 1:-1]  # a view: deletions write through to ``padded``
    iteration = 0
    while max_iterations is None or iteration < max_iterations:
        iteration += 1
        removed = 0
        for table in (_GUO_HALL_FIRST, _GUO_HALL_SECOND):
            delete = table[_neighbour_codes(padded)] & (core == 1)
            removed += int(delete.sum())
            core[delete] = 0
        if removed == 0:
            break
    return core.astype(bool)


def drop_small_components(binary: np.ndarray, min_pixels: int) -> np.ndarray:
    """Remove 8-connected foreground components with fewer than ``min_pixels`` pixels."""
    if min_pixels <= 1 or not binary.any():
        return binary.astype(bool)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_pixels
    keep[0] = False  # label 0 is the background
    return keep[labels]
