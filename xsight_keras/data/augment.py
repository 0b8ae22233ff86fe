"""Joint image/mask augmentation in levels (albumentations), and batch-level MixUp.

Levels add up: 0 none · 1 geometric (flips, rot90, small affine) · 2 + colour (HSV,
brightness/contrast, H&E stain jitter) · 3 + noise and blur · 4 + elastic / grid distortion.
Masks (class and instance maps) follow every geometric change with nearest-neighbour
interpolation, so labels stay aligned with their pixels and no new label values appear.
"""

from __future__ import annotations

import cv2
import numpy as np

MAX_LEVEL = 4


def build_augmentation(level: int):
    """An ``albumentations.Compose`` for ``level`` (0–4), or ``None`` for level 0.

    Call it as ``aug(image=uint8 (H, W, C), masks=[classes, instances])``.
    """
    import albumentations as A

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
            A.HEStain(method="random_preset", intensity_scale_range=(0.85, 1.15),
                      intensity_shift_range=(-0.05, 0.05), p=0.15),  # ~8 ms a call
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


def augment_sample(aug, image, masks, seed: int):
    """Apply ``aug`` (from :func:`build_augmentation`, or ``None``) jointly, seeded by ``seed``.

    ``image`` uint8 (H, W, C), ``masks`` a list of (H, W) integer maps. Returns (image, masks) of
    the same shapes and dtypes.
    """
    if aug is None:
        return image, masks
    aug.set_random_seed(int(seed))
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
