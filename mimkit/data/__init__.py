"""Image sources and transforms: every source yields ``{"image", "label", "mask"}`` sample dicts."""

from mimkit.data.bad import BadSampleWarning
from mimkit.data.folder import IMAGE_EXTENSIONS, ImageFolderSource, load_image
from mimkit.data.hf import HuggingFaceSource
from mimkit.data.sample import SPLITS, make_sample
from mimkit.data.shards import write_shards
from mimkit.data.sources import SOURCE_SCHEMES, build_source, register_scheme
from mimkit.data.synthetic import (
    COARSENESS,
    SHAPES,
    SYNTHETIC_SETS,
    Scene,
    SyntheticShapes,
    SyntheticTextures,
    render_shapes,
    render_textures,
)
from mimkit.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TRANSFORM_KINDS,
    Normalization,
    ToChannels,
    build_transform,
    denormalize,
    eval_transform,
    pretrain_transform,
)
from mimkit.data.wds import Shard, ShardSet, WebDatasetSource, resolve_shards

__all__ = [
    "BadSampleWarning",
    "COARSENESS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "SHAPES",
    "SOURCE_SCHEMES",
    "SPLITS",
    "SYNTHETIC_SETS",
    "Shard",
    "ShardSet",
    "TRANSFORM_KINDS",
    "WebDatasetSource",
    "ImageFolderSource",
    "HuggingFaceSource",
    "Normalization",
    "ToChannels",
    "Scene",
    "SyntheticShapes",
    "SyntheticTextures",
    "build_source",
    "build_transform",
    "denormalize",
    "eval_transform",
    "load_image",
    "make_sample",
    "pretrain_transform",
    "register_scheme",
    "render_shapes",
    "render_textures",
    "resolve_shards",
    "write_shards",
]
