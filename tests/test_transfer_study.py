"""The transfer-learning study end to end on tiny synthetic data: frozen features stay stage 1's, the fine-tuned
and scratch runs move, the table, CSV and plot come out, and a second invocation reuses every run."""

import csv
import json
import os

import jax
import numpy as np
import pytest

from dlcore import checkpoint
from experiments import transfer as study_lib
from experiments.configs import schema


def _config(**study):
  config = schema.transfer()
  config.data.dataset = "synthetic"
  config.model.hidden = (16, 8)
  config.loop.update(batch_size=32, log_every=10)
  config.study.update({"target_sizes": (10,), "source_epochs": 0.5, "target_steps": 6,
                       "methods": ("finetune", "frozen"), **study})
  return config


def _variables(run):
  with checkpoint.Checkpointer(os.path.join(run, "checkpoints")) as ckpt:
    return ckpt.restore_variables()


def _same(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


def test_study_end_to_end_and_reuse(tmp_path):
  config, workdir = _config(), str(tmp_path)
  study_lib.validate(config)
  results = study_lib.run_study(config, workdir, log=lambda m: None)
  runs = os.path.join(workdir, "runs")
  source = _variables(os.path.join(runs, "source"))
  frozen, finetune = (_variables(os.path.join(runs, f"{m}_10")) for m in ("frozen", "finetune"))
  for layer in ("layer0", "layer1"):
    assert _same(frozen["params"][layer], source["params"][layer])  # frozen features: stage 1's, bit for bit
    assert not _same(finetune["params"][layer], source["params"][layer])
  assert not _same(frozen["params"]["classifier"], finetune["params"]["classifier"])
  with open(os.path.join(runs, "finetune_10", "config.json")) as f:
    transfer = json.load(f)["transfer"]
  assert transfer["lr_scale"] == 0.1 and transfer["freeze"] == [] and transfer["init_from"].endswith("source")
  assert [(r["method"], r["per_class"], r["train_examples"], r["steps"]) for r in results["runs"]] == [
      (m, 10, 50, 6) for m in ("finetune", "frozen")]
  with open(os.path.join(workdir, "results.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [float(r["test_accuracy"]) for r in rows] == [r["test_accuracy"] for r in results["runs"]]
  assert os.path.getsize(os.path.join(workdir, "accuracy.png")) > 10_000
  assert "examples per class  finetune  frozen" in study_lib.report(results)
  stamps = {name: os.path.getmtime(os.path.join(runs, name, "metrics.jsonl")) for name in os.listdir(runs)}
  again = study_lib.run_study(config, workdir, log=lambda m: None)
  assert again["runs"] == results["runs"]
  assert stamps == {name: os.path.getmtime(os.path.join(runs, name, "metrics.jsonl")) for name in os.listdir(runs)}


@pytest.mark.parametrize("study,message", [
    ({"target_classes": (4, 5, 6)}, r"share \[4\]; the target classes must be new"),
    ({"methods": ("scratch", "linear")}, "study.methods must be distinct names from scratch, finetune, frozen"),
    ({"target_sizes": (2,)}, r"study.target_sizes \[2\] give fewer training examples than loop.batch_size 32"),
    ({"target_steps": 0}, "study.target_steps must be a positive integer")])
def test_bad_study_keys_are_named(study, message):
  with pytest.raises(ValueError, match=message):
    study_lib.validate(_config(**study))
