"""Data: datasets by name as numpy arrays, seeded resumable batching, preprocessing and on-device augmentation.

  sources     load(name, data_dir=..., validation_size=...) -> Dataset (float32 NHWC in [0, 1], int32 labels);
              select_classes(dataset, classes, per_class=...): a class subset, relabelled, balanced if asked
  pipeline    TrainBatches (shuffled, resumable from any step, per-process slices), EvalBatches (padded + mask)
  resident    DeviceBatches: the training set on the device(s), batches gathered on device, K steps per call
  preprocess  fit on train, apply to every split: mean_image, channel_mean, standardize, pca/zca whitening
  augment     jittable (key, images) -> images: flip, crop, jitter, rotate; make('flip,crop') by name
"""

from dlcore.data import augment, preprocess, resident
from dlcore.data.pipeline import EvalBatches, TrainBatches
from dlcore.data.resident import DeviceBatches
from dlcore.data.sources import NAMES, Dataset, Split, load, read_idx, select_classes, synthetic

__all__ = ["NAMES", "Dataset", "DeviceBatches", "EvalBatches", "Split", "TrainBatches", "augment", "load",
           "preprocess", "read_idx", "resident", "select_classes", "synthetic"]
