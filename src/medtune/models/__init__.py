"""Backbones: the timm model factory, pretrained weights, and block / layer partitions.

Importing this package registers the test backbone ``medtune_tiny_cnn`` and Rama et al.'s
``dcnn3`` with timm and does nothing else.
"""

from . import dcnn, tiny  # noqa: F401  (register dcnn3 and medtune_tiny_cnn with timm)
from ._builder import WEIGHTS_CHOICES, NormalizedModel, check_input_size, create_model, get_num_params
from .blocks import GRANULARITIES, Block, Blocks, format_blocks, get_blocks, list_archs

__all__ = [
    "GRANULARITIES",
    "WEIGHTS_CHOICES",
    "Block",
    "Blocks",
    "NormalizedModel",
    "check_input_size",
    "create_model",
    "format_blocks",
    "get_blocks",
    "get_num_params",
    "list_archs",
]
