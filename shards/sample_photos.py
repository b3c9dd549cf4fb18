"""Real color photos that ship inside the project's dependencies, for the demo and the tests: no download.

scikit-image (``skimage.data``), scikit-learn (``load_sample_images``) and matplotlib (``get_sample_data``) each bundle
a few photographs. ``NATURAL`` are photographs of everyday scenes (people, animals, objects, buildings, landscape), the
kind of photo the system restores; ``SCIENTIFIC`` are microscopy, astronomy and fundus images, whose colors (stain
browns, retina reds, black sky) teach a colorizer little about everyday photos: kept apart so a caller chooses.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

NATURAL = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle", "china", "flower", "grace_hopper")
SCIENTIFIC = ("immunohistochemistry", "hubble_deep_field", "retina")
ALL = NATURAL + SCIENTIFIC


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        image = getattr(skimage.data, name)()
        return image[0] if isinstance(image, tuple) else image  # stereo_motorcycle: (left, right, disparity)

    return load


def _sklearn(file_name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(file_name)

    return load


def _matplotlib(file_name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from matplotlib.cbook import get_sample_data
        from PIL import Image

        with get_sample_data(file_name) as f, Image.open(f) as img:
            return np.asarray(img.convert("RGB"))

    return load


_LOADERS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "chelsea": _skimage("chelsea"),
    "coffee": _skimage("coffee"),
    "rocket": _skimage("rocket"),
    "motorcycle": _skimage("stereo_motorcycle"),
    "immunohistochemistry": _skimage("immunohistochemistry"),
    "hubble_deep_field": _skimage("hubble_deep_field"),
    "retina": _skimage("retina"),
    "china": _sklearn("china.jpg"),
    "flower": _sklearn("flower.jpg"),
    "grace_hopper": _matplotlib("grace_hopper.jpg"),
}


def load_photo(name: str) -> np.ndarray:
    """The bundled photo ``name`` as uint8 RGB [H, W, 3] (C-contiguous)."""
    if name not in _LOADERS:
        raise ValueError(f"unknown bundled photo {name!r}; choose from {', '.join(ALL)}")
    image = np.asarray(_LOADERS[name]())
    if image.ndim != 3 or image.shape[2] < 3 or image.dtype != np.uint8:
        raise ValueError(f"bundled photo {name!r} is {image.dtype} {image.shape}, not uint8 RGB")
    return np.ascontiguousarray(image[..., :3])


def random_square_crops(image: np.ndarray, count: int, rng: np.random.Generator, *, min_share: float = 0.4,
                        hflip: bool = True) -> list[np.ndarray]:
    """``count`` random square crops of ``image``, each ``min_share``..1 of its short side, half of them mirrored."""
    height, width = image.shape[:2]
    crops = []
    for _ in range(count):
        side = int(min(height, width) * rng.uniform(min_share, 1.0))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        crop = image[top:top + side, left:left + side]
        if hflip and rng.random() < 0.5:
            crop = crop[:, ::-1]
        crops.append(np.ascontiguousarray(crop))
    return crops
