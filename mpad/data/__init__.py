"""Datasets in the MVTec AD layout: reading, downloading, few-shot selection.

Importing this package does no I/O.
"""

from mpad.data.catalog import MVTEC_CATEGORIES, MVTEC_TEXTURES
from mpad.data.mvtec import (
    DatasetError,
    Sample,
    image_size,
    is_complete_mvtec,
    is_image_file,
    list_categories,
    list_split,
    load_image,
    load_mask,
    summarize_category,
)
from mpad.data.shots import pick_shots

__all__ = [
    "MVTEC_CATEGORIES",
    "MVTEC_TEXTURES",
    "DatasetError",
    "Sample",
    "image_size",
    "is_complete_mvtec",
    "is_image_file",
    "list_categories",
    "list_split",
    "load_image",
    "load_mask",
    "pick_shots",
    "summarize_category",
]
