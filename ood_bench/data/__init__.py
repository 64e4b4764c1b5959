"""Data: sources (where images come from), the resize protocol and pair building."""

from ood_bench.data.imageset import ImageSet, iter_batches, select_rows
from ood_bench.data.pair import Pair, Split, build_pair
from ood_bench.data.sources import (
    DatasetNotFoundError,
    DigitsSource,
    IdxSource,
    ImageFolderSource,
    ImageListSource,
    NpzSource,
    Source,
    TorchvisionSource,
)

__all__ = [
    "DatasetNotFoundError",
    "DigitsSource",
    "IdxSource",
    "ImageFolderSource",
    "ImageListSource",
    "ImageSet",
    "NpzSource",
    "Pair",
    "Source",
    "Split",
    "TorchvisionSource",
    "build_pair",
    "iter_batches",
    "select_rows",
]
