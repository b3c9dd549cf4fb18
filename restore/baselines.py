"""Reference predictions the trained model must beat, scored by the same scorer.

- ``gray_copy``: the damaged gray input copied to R=G=B (what "doing nothing" scores).
- ``opencv_inpaint``: OpenCV Telea inpainting of the hole, still gray, copied to RGB.
"""
from __future__ import annotations

import cv2
import numpy as np

BASELINES = ("gray_copy", "opencv_inpaint")


def gray_copy(gray: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


def opencv_inpaint(gray: np.ndarray, mask: np.ndarray, radius: int = 5) -> np.ndarray:
    filled = cv2.inpaint(gray, mask.astype(np.uint8) * 255, radius, cv2.INPAINT_TELEA)
    return np.repeat(filled[..., None], 3, axis=-1)


def predict(name: str, gray: np.ndarray, mask: np.ndarray) -> np.ndarray:
    if name == "gray_copy":
        return gray_copy(gray, mask)
    if name == "opencv_inpaint":
        return opencv_inpaint(gray, mask)
    raise ValueError(f"unknown baseline {name!r}; choose from {BASELINES}")
