"""sd-scripts' weak colour augmentation (``color_aug``): a third of the showings get a small hue shift or gamma change.

The random choice is drawn by the epoch plan (so a resumed run repeats it); this module only applies it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

COLOR_AUG_PROBABILITY = 0.33
HUE_SHIFT_DEGREES = 16.0  # sd-scripts shifts OpenCV hue (0-180) by up to 8, i.e. up to 16 of 360 degrees
GAMMA_RANGE = (0.95, 1.05)


def draw_color_change(rng: np.random.Generator) -> tuple[str, float] | None:
    """None (two times in three), else ("hue", degrees in [-16, 16]) or ("gamma", γ in [0.95, 1.05]) at equal odds."""
    apply, kind, amount = rng.random(3)
    if apply > COLOR_AUG_PROBABILITY:
        return None
    if kind > 0.5:
        return "hue", float((2 * amount - 1) * HUE_SHIFT_DEGREES)
    low, high = GAMMA_RANGE
    return "gamma", float(low + (high - low) * amount)


def apply_color_change(image: Image.Image, change: tuple[str, float] | None) -> Image.Image:
    """``image`` (RGB) with its hue rotated by the given degrees, or its 0-255 values raised to γ and clipped (as
    sd-scripts does, so γ > 1 brightens mid-tones and saturates highlights)."""
    if change is None:
        return image
    kind, amount = change
    if kind == "hue":
        hsv = np.asarray(image.convert("HSV")).copy()
        shift = round(amount / 360.0 * 256.0)
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + shift) % 256).astype(np.uint8)
        return Image.fromarray(hsv, "HSV").convert("RGB")
    values = np.asarray(image.convert("RGB"), dtype=np.float64)
    return Image.fromarray(np.clip(values**amount, 0, 255).astype(np.uint8), "RGB")
