"""Dataset preparation (``mixpipe data prepare``) and the map-style datasets the loaders read.

See :mod:`mixpipe.data.prepare` for the on-disk layout.
"""
from .datasets import ArrayDataset, FileListDataset, Prepared, find_prepared, read_classes
from .errors import DataError
from .prepare import prepare_fashion_mnist, prepare_tree

__all__ = ["ArrayDataset", "FileListDataset", "Prepared", "find_prepared", "read_classes",
           "DataError", "prepare_fashion_mnist", "prepare_tree"]
