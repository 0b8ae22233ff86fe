"""Joint image/mask augmentation in levels (albumentations), and batch-level MixUp.

Levels add up: 0 none · 1 geometric (flips, rot90, small affine) · 2 + colour (HSV,
brightness/contrast, H&E stain jitter) · 3 + noise and blur · 4 + elastic / grid distortion.
Masks (class and instance maps) follow every geometric change with nearest-neighbour
interpolation, so labels stay aligned with their pixels and no new label values appear.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
from skimage.color import hed_from_rgb, rgb_from_hed

MAX_LEVEL = 4
# uint8 intensity -> optical density, -ln((I + 1) / 256)
_OPTICAL_DENSITY = (-np.log((np.arange(256, dtype=np.float64) + 1) / 256)).astype(np.float32)
_SKIMAGE_OD_SCALE = float(-np.log(1e-6))  # skimage expresses stain concentrations in OD / this


def hed_jitter(image: np.ndarray, alpha, beta) -> np.ndarray:
    """Perturb the haematoxylin, eosin and DAB concentrations of an RGB uint8 image.

    Tellez et al. 2018: in the Ruifrok–Johnston HED space (scikit-image's matrices) each stain
    concentration becomes ``c * alpha + beta``. Being linear in optical density, the whole change
    is one 3×3 affine map applied with OpenCV: about 1 ms for 256×256 (albumentations' HEStain
    solves a least-squares problem per call, about 8 ms). Returns uint8 (H, W, 3).
    """
    alpha = np.asarray(alpha, np.float64)
    beta = np.asarray(beta, np.float64)
    transform = hed_from_rgb @ np.diag(alpha) @ rgb_from_hed  # row vectors: od' = od @ transform
    offset = _SKIMAGE_OD_SCALE * beta @ rgb_from_hed
    matrix = np.hstack([transform.T, offset[:, None]]).astype(np.float32)
    od = cv2.transform(cv2.LUT(image, _OPTICAL_DENSITY), matrix)
    return cv2.convertScaleAbs(cv2.exp(-od), alpha=256, beta=-1)


class HEDJitter(A.ImageOnlyTransform):
    """Albumentations transform for :func:`hed_jitter` on RGB uint8 images (grayscale passes).

    ``sigma``: alpha ~ U(1 - sigma, 1 + sigma) and beta ~ U(-sigma, sigma) per stain
    (Tellez et al. use 0.05 for "HED-light" and 0.2 for "HED-strong").
    """

    def __init__(self, sigma: float = 0.05, p: float = 0.5):
        super().__init__(p=p)
        self.sigma = float(sigma)

    def get_params(self):
        rng = self.random_generator
        return {"alpha": rng.uniform(1 - self.sigma, 1 + self.sigma, 3),
                "beta": rng.uniform(-self.sigma, self.sigma, 3)}

    def apply(self, img, alpha, beta, **params):
        if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
            return img
        return hed_jitter(img, alpha, beta)

    def get_transform_init_args_names(self):
        return ("sigma",)


def build_augmentation(level: int):
    """An ``albumentations.Compose`` for ``level`` (0–4), or ``None`` for level 0.

    Call it as ``aug(image=uint8 (H, W, C), masks=[classes, instances])``.
    """
    if not 0 <= level <= MAX_LEVEL:
        raise ValueError(f"augmentation level must be 0..{MAX_LEVEL}, got {level}")
    if level == 0:
        return None
    reflect = cv2.BORDER_REFLECT_101
    transforms = [
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-15, 15),
                 border_mode=reflect, p=0.5),
    ]
    if level >= 2:
        transforms += [
            A.HueSaturationValue(hue_shift_limit=8, sat_shift_limit=15, val_shift_limit=10, p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
            HEDJitter(sigma=0.05, p=0.5),
        ]
    if level >= 3:
        transforms += [
            A.GaussNoise(std_range=(0.01, 0.04), p=0.3),
            A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.MotionBlur(blur_limit=(3, 5))], p=0.2),
        ]
    if level >= 4:
        transforms += [
            A.OneOf([
                A.ElasticTransform(alpha=30, sigma=6, border_mode=reflect),
                A.GridDistortion(distort_limit=0.2, border_mode=reflect),
            ], p=0.3),
        ]
    return A.Compose(transforms)


def _seed_each_transform(transform, rng: np.random.Generator) -> None:
    """Give ``transform`` and, depth first, every transform inside it its own seed from ``rng``.

    ``Compose.set_random_seed(s)`` hands the same ``s`` to every child, so all of them draw the
    same numbers: with equal probabilities each sample got every transform or none.
    """
    transform.set_random_seed(int(rng.integers(2**31)))
    for child in getattr(transform, "transforms", ()):
        _seed_each_transform(child, rng)


def augment_sample(aug, image, masks, seed: int):
    """Apply ``aug`` (from :func:`build_augmentation`, or ``None``) jointly, seeded by ``seed``.

    ``image`` uint8 (H, W, C), ``masks`` a list of (H, W) integer maps. Returns (image, masks) of
    the same shapes and dtypes.
    """
    if aug is None:
        return image, masks
    _seed_each_transform(aug, np.random.default_rng(int(seed)))
    out = aug(image=image, masks=list(masks))
    # albumentations may hand masks back in a common dtype; labels are exact, restore each dtype
    return out["image"], [np.asarray(m).astype(src.dtype, copy=False) for m, src in zip(out["masks"], masks)]


def mixup(images: np.ndarray, targets, alpha: float, rng: np.random.Generator):
    """MixUp (Zhang et al. 2018) of a batch with a shuffled copy of itself.

    ``images`` float32 (B, ...); ``targets`` an array of one-hot/probability targets (B, ...) or a
    dict of them (multi-scale outputs). One λ ~ Beta(alpha, alpha) per sample. Returns mixed
    (images, targets) with the same shapes; ``alpha <= 0`` returns the inputs unchanged.
    """
    if alpha <= 0 or len(images) < 2:
        return images, targets
    b = len(images)
    lam = rng.beta(alpha, alpha, size=b).astype(np.float32)
    perm = rng.permutation(b)

    def mix(x):
        w = lam.reshape((b,) + (1,) * (x.ndim - 1))
        return w * x + (1 - w) * x[perm]

    mixed_targets = {k: mix(v) for k, v in targets.items()} if isinstance(targets, dict) else mix(targets)
    return mix(images), mixed_targets
