"""Metric records: one JSON line per logged step in `metrics.jsonl`, mirrored to TensorBoard event files."""

import json
import os

__all__ = ["MetricWriter", "read"]


class MetricWriter:
  """Appends {'step', 'split', **metrics} records to `workdir/metrics.jsonl` and TensorBoard scalars to
  `workdir/tensorboard`; `enabled=False` (processes other than 0) writes nothing."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # imported here: it loads torch when torch is installed (~4 s)
      os.makedirs(workdir, exist_ok=True)
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, metrics: dict) -> None:
    """Records `metrics` (name -> number or scalar array, stored as float) of `split` ('train', 'validation', ...)
    at `step`: one JSON line, and one TensorBoard scalar '<split>/<name>' each, flushed at once."""
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for name, value in metrics.items():
      self._tb.add_scalar(f"{split}/{name}", float(value), int(step))
    self._tb.flush()

  def truncate_after(self, step: int) -> None:
    """Drops records past `step`: a resumed run re-logs what came after its checkpoint."""
    if self.enabled and os.path.exists(self.path):
      kept = [r for r in read(self.path) if r["step"] <= step]
      with open(self.path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
      os.replace(self.path + ".tmp", self.path)

  def close(self) -> None:
    """Closes the TensorBoard writer (metrics.jsonl is opened per write and needs no closing)."""
    if self._tb is not None:
      self._tb.close()


def read(path: str) -> list[dict]:
  """The records of a metrics.jsonl file; a torn last line (a killed run) is skipped."""
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records
