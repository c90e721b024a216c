"""Seeded, resumable batching over numpy arrays, with per-process slices for multi-host data parallelism.

`TrainBatches`: epoch e visits the examples in the permutation drawn from numpy's SeedSequence((seed, e)), cut
into `len // batch_size` batches (the remainder is dropped, so every batch has the same static shape). Batch k
is a pure function of (seed, k): `batch_at(k)` or `iterate(start_step=k)` resumes a run on exactly the batch
order it would have seen.

`EvalBatches`: the examples in their stored order, every one exactly once; the last batch is padded (zeros) to
the full size and every batch carries 'mask' (bool, True for real examples), so shapes stay static and padded
rows are dropped by weighting metrics with the mask.

Multi-host: with process_count P, each process gets the contiguous slice [i * B/P, (i+1) * B/P) of every global
batch of size B; concatenating the slices of processes 0..P-1 gives the single-process batch. Every process uses
the same seed. Batches are dicts of numpy arrays ({'image', 'label'} for a `Split`, plus 'mask' for eval).
"""

from collections.abc import Iterator, Mapping
import math

import numpy as np

from dlcore import checks

__all__ = ["EvalBatches", "TrainBatches"]


def _arrays(data) -> dict[str, np.ndarray]:
  """{'image', 'label'} of a Split, or the arrays of a mapping, checked to share a non-zero leading length."""
  arrays = dict(data.as_dict() if hasattr(data, "as_dict") else data)
  if not arrays:
    raise ValueError("data must hold at least one array, got none")
  lengths = {key: len(value) for key, value in arrays.items()}
  if len(set(lengths.values())) != 1:
    raise ValueError(f"arrays in data must have the same length, got {lengths}")
  if not next(iter(lengths.values())):
    raise ValueError("data is empty (0 examples)")
  return arrays


def _check_processes(batch_size: int, process_index: int, process_count: int) -> int:
  """Validates the process arguments; returns the per-process batch size."""
  checks.positive("batch_size", batch_size)
  checks.positive("process_count", process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}) for process_count={process_count}, "
                     f"got {process_index}")
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} (global) must be divisible by process_count {process_count}")
  return batch_size // process_count


class TrainBatches:
  """Shuffled, batched, endlessly repeating training batches, reproducible from (seed, global step).

  data: a `Split` or a mapping of equally long arrays. batch_size: the global batch size (over all processes);
  must not exceed the number of examples (ValueError). Each process gets batch_size // process_count rows.
  """

  def __init__(self, data: Mapping[str, np.ndarray], batch_size: int, *, seed: int = 0, process_index: int = 0,
               process_count: int = 1):
    self._arrays = _arrays(data)
    self.local_batch_size = _check_processes(batch_size, process_index, process_count)
    self.num_examples = len(next(iter(self._arrays.values())))
    if batch_size > self.num_examples:
      raise ValueError(f"batch_size {batch_size} is larger than the dataset size {self.num_examples}")
    checks.non_negative("seed", seed)
    self.batch_size = batch_size
    self.seed = int(seed)
    self.process_index = process_index
    self.process_count = process_count
    self.steps_per_epoch = self.num_examples // batch_size
    self._cached_epoch, self._cached_perm = None, None

  def arrays(self) -> dict[str, np.ndarray]:
    """The whole training data, every example (each process holds all of it and slices batches itself)."""
    return dict(self._arrays)

  def permutation(self, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the examples (the same on every process)."""
    if epoch != self._cached_epoch:
      self._cached_perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
      self._cached_epoch = epoch
    return self._cached_perm

  def indices_at(self, step: int) -> np.ndarray:
    """Indices into the data of this process's rows of global batch `step`."""
    checks.non_negative("step", step)
    epoch, within = divmod(int(step), self.steps_per_epoch)
    start = within * self.batch_size + self.process_index * self.local_batch_size
    return self.permutation(epoch)[start:start + self.local_batch_size]

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """This process's slice of global batch number `step` (0-based, counted over all epochs)."""
    idx = self.indices_at(step)
    return {key: value[idx] for key, value in self._arrays.items()}

  def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Batches start_step, start_step + 1, ... (num_steps of them, or without end)."""
    checks.non_negative("start_step", start_step)
    stop = math.inf if num_steps is None else start_step + checks.non_negative("num_steps", num_steps)
    step = start_step
    while step < stop:
      yield self.batch_at(step)
      step += 1

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self.iterate(0)


class EvalBatches:
  """Fixed-order batches covering every example once; the last is zero-padded, and 'mask' marks real rows.

  Re-iterable; len() is the number of batches, ceil(num_examples / batch_size). batch_size may exceed the
  number of examples (one padded batch).
  """

  def __init__(self, data: Mapping[str, np.ndarray], batch_size: int, *, process_index: int = 0,
               process_count: int = 1):
    self._arrays = _arrays(data)
    if "mask" in self._arrays:
      raise ValueError("data must not hold a 'mask' array: EvalBatches adds it")
    self.local_batch_size = _check_processes(batch_size, process_index, process_count)
    self.num_examples = len(next(iter(self._arrays.values())))
    self.batch_size = batch_size
    self.process_index = process_index
    self.process_count = process_count

  def __len__(self) -> int:
    return -(-self.num_examples // self.batch_size)

  def batch_at(self, index: int) -> dict[str, np.ndarray]:
    """This process's slice of eval batch `index` in [0, len(self))."""
    if not 0 <= index < len(self):
      raise ValueError(f"eval batch index must be in [0, {len(self)}), got {index}")
    start = index * self.batch_size + self.process_index * self.local_batch_size
    rows = np.arange(start, start + self.local_batch_size)
    mask = rows < self.num_examples
    idx = np.where(mask, rows, 0)
    batch = {}
    for key, value in self._arrays.items():
      gathered = value[idx]
      gathered[~mask] = 0
      batch[key] = gathered
    batch["mask"] = mask
    return batch

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    for index in range(len(self)):
      yield self.batch_at(index)
