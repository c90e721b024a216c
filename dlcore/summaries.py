"""Metric records: one JSON line per logged step in `metrics.jsonl`, mirrored to TensorBoard.

metrics.jsonl is the record of truth. TensorBoard's event file is rebuilt from it whenever the writer starts
over (a fresh or a resumed run), so after any restart both hold each (step, split) once, in step order, in one
events file, and the run's hyperparameters appear in TensorBoard's HParams view.
"""

import glob
import json
import os

__all__ = ["MetricWriter", "read"]


class MetricWriter:
  """Appends {'step', 'split', **metrics} records to `workdir/metrics.jsonl` and TensorBoard scalars
  '<split>/<name>' to `workdir/tensorboard`; `hparams` ({name: number, string or bool}) go to the HParams view.
  `enabled=False` (processes other than 0) writes nothing."""

  def __init__(self, workdir: str, *, enabled: bool = True, hparams: dict | None = None):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb_dir = os.path.join(workdir, "tensorboard")
    self.enabled = enabled
    self.hparams = dict(hparams or {})
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)

  def _open_tensorboard(self) -> None:
    """A fresh events file holding the hparams and every record of metrics.jsonl; older files are removed."""
    from tensorboardX import SummaryWriter  # imported here: it loads torch when torch is installed
    from tensorboardX.summary import hparams as hparams_summary
    for old in glob.glob(os.path.join(self.tb_dir, "events.out.tfevents.*")):
      os.remove(old)
    self._tb = SummaryWriter(self.tb_dir)
    if self.hparams:
      for summary in hparams_summary(self.hparams, {}):
        self._tb.file_writer.add_summary(summary)
    for record in read(self.path) if os.path.exists(self.path) else []:
      self._add_scalars(record)
    self._tb.flush()

  def _add_scalars(self, record: dict) -> None:
    for name, value in record.items():
      if name not in ("step", "split"):
        self._tb.add_scalar(f"{record['split']}/{name}", value, record["step"])

  def write(self, step: int, split: str, metrics: dict) -> None:
    """Records `metrics` (name -> number or scalar array, stored as float) of `split` ('train', 'validation', ...)
    at `step`: one JSON line, and one TensorBoard scalar each, flushed at once."""
    if not self.enabled:
      return
    if self._tb is None:
      self._open_tensorboard()
    record = {"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    self._add_scalars(record)
    self._tb.flush()

  def truncate_after(self, step: int, *, final_splits: tuple[str, ...] = ("test",)) -> None:
    """Drops the records past `step` (a restarted run logs what came after its checkpoint again; 0 for a run
    starting over), and those of `final_splits` (written once training has ended) at `step` itself, then
    rebuilds TensorBoard from what is kept."""
    if not self.enabled:
      return
    if os.path.exists(self.path):
      kept = [r for r in read(self.path) if r["step"] < step or (r["step"] == step and r["split"] not in final_splits)]
      with open(self.path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
      os.replace(self.path + ".tmp", self.path)
    self.close()
    self._open_tensorboard()

  def close(self) -> None:
    """Closes the TensorBoard writer (metrics.jsonl is opened per write and needs no closing)."""
    if self._tb is not None:
      self._tb.close()
      self._tb = None


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
