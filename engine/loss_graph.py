"""The loss curve of a tuning run as an IMAGE (drawn with PIL, which ComfyUI ships; no plotting library)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 512, 256, 36


def loss_graph(losses: Sequence[float], title: str) -> torch.Tensor:
    """``(1, HEIGHT, WIDTH, 3)`` float in [0, 1]: the losses per step (blue) and their running mean (red), on a
    log scale when they span more than a decade; min and max written on the axis."""
    values = np.asarray(losses, dtype=np.float64)
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError(f"losses: expected finite losses of at least one step, got {list(losses)[:8]}")
    log = values.min() > 0 and values.max() / values.min() > 10
    y = np.log10(values) if log else values
    window = max(1, values.size // 10)
    smooth = np.convolve(y, np.ones(window) / window, mode="valid")
    low, high = float(y.min()), float(y.max())
    span = high - low or 1.0
    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = MARGIN + 20, 20, WIDTH - 10, HEIGHT - MARGIN

    def points(series: np.ndarray, offset: int) -> list[tuple[float, float]]:
        steps = max(1, values.size - 1)
        return [(left + (i + offset) / steps * (right - left), bottom - (v - low) / span * (bottom - top))
                for i, v in enumerate(series)]

    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=1)
    if values.size > 1:
        draw.line(points(y, 0), fill=(60, 90, 220), width=1)
        draw.line(points(smooth, window - 1), fill=(220, 40, 40), width=2)
    else:
        draw.ellipse([left - 3, bottom - 3, left + 3, bottom + 3], fill=(60, 90, 220))
    draw.text((4, top - 4), f"{values.max():.3g}", fill="black")
    draw.text((4, bottom - 8), f"{values.min():.3g}", fill="black")
    draw.text((left, bottom + 8), f"step 1 .. {values.size}" + ("   (log scale)" if log else ""), fill="black")
    draw.text((left + 4, 4), title, fill="black")
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
