"""Image data: MATLAB bicubic resizing and benchmark image folders."""

from .datasets import dataset_root, find_datasets, list_images, read_image
from .imresize import imresize

__all__ = ["dataset_root", "find_datasets", "imresize", "list_images", "read_image"]
