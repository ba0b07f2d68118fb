"""Event data: readers for the published formats, frame integration, datasets, and events made
from still images (the offline :class:`Digits` default).

>>> from osbc.data import load_dataset
>>> train = load_dataset("digits", train=True, frames=20)   # no download needed
>>> frames, label = train[0]                                 # [20, 2, 34, 34] float32, int
"""

from .base import EventDataset, Sample
from .cache import CACHE_ENV, default_cache_dir
from .cifar10dvs import CIFAR10DVS
from .datasets import load_dataset
from .dvsgesture import DVSGesture
from .nmnist import NMNIST
from .subsets import LabeledSubset, calibration_split, stratified_split
from .frames import downsampled_size, events_to_frames, frame_index, sparse_frame_counts
from .readers import (
    EVENT_DTYPE,
    EventFileError,
    EventFileWarning,
    make_events,
    read_aedat20,
    read_aedat31,
    read_nmnist,
    write_aedat20,
    write_aedat31,
    write_nmnist,
)
from .saccade import Digits, saccade_events, upsample_images
from .splits import Splits, TensorSet, calibration_inputs, calibration_tensor, in_memory, materialize

__all__ = [
    "EVENT_DTYPE", "EventFileError", "EventFileWarning", "make_events",
    "read_nmnist", "write_nmnist", "read_aedat31", "write_aedat31", "read_aedat20", "write_aedat20",
    "events_to_frames", "sparse_frame_counts", "frame_index", "downsampled_size",
    "EventDataset", "Sample", "NMNIST", "DVSGesture", "CIFAR10DVS", "Digits", "LabeledSubset",
    "stratified_split", "calibration_split", "load_dataset", "default_cache_dir", "CACHE_ENV",
    "saccade_events", "upsample_images",
    "TensorSet", "in_memory", "materialize", "calibration_inputs", "calibration_tensor", "Splits",
]
