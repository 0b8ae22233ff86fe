"""Datasets and the input pipeline: preparation, preprocessing, augmentation, loaders."""

from xsight_keras.data.augment import MAX_LEVEL, augment_sample, build_augmentation, mixup
from xsight_keras.data.demo import demo_tile, write_demo_dataset
from xsight_keras.data.folders import find_folder_pairs, prepare_folders, read_folder_sample
from xsight_keras.data.images import read_image
from xsight_keras.data.loader import (
    EpochBatchSampler,
    SegmentationDataset,
    make_loader,
    parse_schedule,
    value_at,
)
from xsight_keras.data.monuseg import (
    find_monuseg_pairs,
    prepare_monuseg,
    rasterize_polygons,
    read_aperio_polygons,
    read_monuseg_sample,
)
from xsight_keras.data.pannuke import find_pannuke_folds, masks_to_maps, prepare_pannuke
from xsight_keras.data.prepared import PreparedDataset, PreparedWriter, Sample
from xsight_keras.data.preprocess import PreprocessConfig, apply_clahe, preprocess_image

__all__ = [
    "MAX_LEVEL", "EpochBatchSampler", "PreparedDataset", "PreparedWriter", "PreprocessConfig",
    "Sample", "SegmentationDataset", "apply_clahe", "augment_sample", "build_augmentation",
    "demo_tile", "find_folder_pairs", "find_monuseg_pairs", "find_pannuke_folds", "make_loader",
    "masks_to_maps", "mixup", "parse_schedule", "prepare_folders", "prepare_monuseg",
    "prepare_pannuke", "preprocess_image", "rasterize_polygons", "read_aperio_polygons",
    "read_folder_sample", "read_image", "read_monuseg_sample", "value_at", "write_demo_dataset",
]
