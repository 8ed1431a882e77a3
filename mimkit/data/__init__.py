"""Image sources and transforms: every source yields ``{"image", "label", "mask"}`` sample dicts."""

from mimkit.data.folder import IMAGE_EXTENSIONS, ImageFolderSource, load_image
from mimkit.data.sample import SPLITS, make_sample
from mimkit.data.sources import SOURCE_SCHEMES, build_source, register_scheme
from mimkit.data.synthetic import SHAPES, SYNTHETIC_SETS, Scene, SyntheticShapes, render_shapes
from mimkit.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TRANSFORM_KINDS,
    build_transform,
    denormalize,
    eval_transform,
    pretrain_transform,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "SHAPES",
    "SOURCE_SCHEMES",
    "SPLITS",
    "SYNTHETIC_SETS",
    "TRANSFORM_KINDS",
    "ImageFolderSource",
    "Scene",
    "SyntheticShapes",
    "build_source",
    "build_transform",
    "denormalize",
    "eval_transform",
    "load_image",
    "make_sample",
    "pretrain_transform",
    "register_scheme",
    "render_shapes",
]
