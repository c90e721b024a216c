"""The ReLU-vs-tanh binary (Krizhevsky et al. 2012 Fig. 1): end to end on a tiny JPEG image folder, rerun reuse,
bit-exact resume, the rate search (fewest epochs to target, widening at an edge), the cuda-convnet init, the
statistics at initialisation, and the epochs-to-target / speed-up arithmetic with its bounds."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dlcore import data
from experiments import relu_vs_tanh as rvt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ARGS = ["--config.study.lr_grid=(0.01, 0.03)", "--config.study.widen_rounds=0", "--config.study.max_epochs=2",
        "--config.loop.batch_size=20", "--config.study.seeds=1", "--config.study.stop_at_target=False"]


def _image_folder(root, per_class=12):
  """train/<class>/*.jpg and test/<class>/*.jpg: a noisy colour per class, 32x32, saved at PIL's quality 75."""
  rng = np.random.default_rng(0)
  colours = rng.uniform(0.1, 0.9, (len(CLASSES), 3))
  for split, n in (("train", per_class), ("test", 2)):
    for k, name in enumerate(CLASSES):
      os.makedirs(root / split / name)
      for i in range(n):
        image = np.clip(colours[k] + 0.15 * rng.standard_normal((32, 32, 3)), 0, 1)
        Image.fromarray((image * 255).astype(np.uint8)).save(root / split / name / f"{i:04d}.jpg")
  return root


def _binary(workdir, data_dir, *extra):
  cmd = [sys.executable, "-m", "experiments.relu_vs_tanh", f"--config.data.data_dir={data_dir}", f"--workdir={workdir}",
         *ARGS, *extra]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc.stdout + proc.stderr


def _study(data_dir, **overrides):
  study = {"activations": ["relu", "tanh"], "init": "lecun_normal", "lr_grid": [0.01, 0.03], "widen_rounds": 0,
           "target_error": 0.25, "dataset": "cifar10", "data_dir": str(data_dir), "subset": 0,
           "preprocess": "mean_image", "max_epochs": 2, "batch": 20, "optimizer": "momentum", "momentum": 0.9,
           "seeds": [0], "stop_at_target": False}
  return {**study, **overrides}


def _curves(workdir):
  """{(activation, learning_rate, seed): [(epoch, step, train_error), ...]} from curves.csv."""
  curves = {}
  with open(os.path.join(workdir, "curves.csv")) as f:
    for row in csv.DictReader(f):
      curves.setdefault((row["activation"], float(row["learning_rate"]), int(row["seed"])), []).append(
          (int(row["epoch"]), int(row["step"]), float(row["train_error"])))
  return curves


def test_end_to_end_then_rerun_reuses_every_population(tmp_path):
  data_dir = _image_folder(tmp_path / "images")
  workdir = tmp_path / "study"
  out = _binary(workdir, data_dir)
  assert "CIFAR-10 (JPEG q75 proxy)" in out and "img/s" in out and "ETA" in out
  results = json.loads((workdir / "results.json").read_text())
  for key in ("speedup", "speedup_std", "speedup_kind", "speedups", "learning_rates", "search", "runs",
              "activations", "verdict", "data", "data_source", "target_error", "settings", "steps_per_epoch",
              "init_stats"):
    assert key in results, key
  assert results["data"].startswith("CIFAR-10 (JPEG q75 proxy)") and results["steps_per_epoch"] == 6
  assert results["verdict"] in out
  for name in ("training_error.png", "lr_search.png", "rates.csv", "init_stats.csv"):
    assert (workdir / name).exists(), name

  # Every (rate, seed) member logged each epoch; the chosen rate has the fewest epochs to target (misses count
  # as max_epochs + 1), then the lowest final error.
  curves = _curves(workdir)
  assert set(curves) == {(a, lr, 0) for a in ("relu", "tanh") for lr in (0.01, 0.03)}
  for act in ("relu", "tanh"):
    scores = {}
    for lr in (0.01, 0.03):
      rows = curves[act, lr, 0]
      assert [r[0] for r in rows] == [1, 2] and [r[1] for r in rows] == [6, 12]
      epochs = next((e for e, _, err in rows if err <= 0.25), None)
      scores[lr] = (3 if epochs is None else epochs, rows[-1][2], lr)
    assert results["learning_rates"][act] == min(scores, key=scores.get)
    run = next(r for r in results["runs"] if r["activation"] == act)
    rows = curves[act, results["learning_rates"][act], 0]
    assert run["epochs_to_target"] == next((e for e, _, err in rows if err <= 0.25), None)
    assert run["best_train_error"] == min(err for _, _, err in rows)
  assert {r["layer"] for r in results["init_stats"]} == {"conv1", "conv2", "conv3", "classifier"}

  logs = []  # the same study again: every population is reused, nothing trains
  again = rvt.run_study(_study(data_dir), str(workdir), log=logs.append)
  assert sum("finished before" in line for line in logs) == 2 and not any(" epoch 1/" in line for line in logs)
  assert again["runs"] == results["runs"]


def test_resumed_populations_equal_uninterrupted_ones_and_other_settings_are_refused(tmp_path):
  data_dir = _image_folder(tmp_path / "images")
  one = dict(activations=["relu"], lr_grid=[0.03], seeds=[1])
  rvt.run_study(_study(data_dir, max_epochs=3, **one), str(tmp_path / "whole"), log=print)
  logs = []
  rvt.run_study(_study(data_dir, max_epochs=1, **one), str(tmp_path / "split"), log=logs.append)
  rvt.run_study(_study(data_dir, max_epochs=3, **one), str(tmp_path / "split"), log=logs.append)
  assert sum("resumed from epoch 1" in line for line in logs) == 1
  read = lambda d: json.loads((tmp_path / d / "runs" / "relu_round0" / "round.json").read_text())["members"][0]
  keys = ("epoch", "step", "train_error", "train_loss", "step_loss")
  assert [[r[k] for k in keys] for r in read("whole")["records"]] == [[r[k] for k in keys]
                                                                      for r in read("split")["records"]]
  with pytest.raises(ValueError, match="subset: 0 -> 100"):
    rvt.run_study(_study(data_dir, subset=100, **one), str(tmp_path / "split"), log=print)
  rvt.run_study(_study(data_dir, subset=100, max_epochs=1, **one), str(tmp_path / "split"), overwrite=True,
                log=print)


def _round(scores: dict[float, list], max_epochs=5, diverged=()):
  """A round.json-like dict whose member (rate, seed i) reaches 0.25 at epoch scores[rate][i] (None: never)."""
  members = []
  for lr, epochs in scores.items():
    for seed, e in enumerate(epochs):
      errors = [0.2 if e is not None and i + 1 >= e else 0.5 for i in range(max_epochs)]
      members.append({"learning_rate": lr, "seed": seed,
                      "records": [{"epoch": i + 1, "train_error": err, "diverged": lr in diverged}
                                  for i, err in enumerate(errors)]})
  return {"settings": {"rates": list(scores)}, "members": members}


def test_the_rate_search_picks_the_fewest_epochs_and_widens_at_an_edge():
  table = rvt.rate_table([_round({0.01: [4, 5], 0.03: [2, 3], 0.1: [3, 3]})], 0.25, 5)
  assert [row["score"] for row in table] == [4.5, 2.5, 3.0]
  assert rvt.choose_rate(table) == (0.03, None)
  edge = rvt.rate_table([_round({0.01: [4, None], 0.03: [2, 2]})], 0.25, 5)  # a miss counts as 6
  assert [row["score"] for row in edge] == [5.0, 2.0] and rvt.choose_rate(edge) == (0.03, "high")
  assert rvt.next_rate(edge, "high") == pytest.approx(0.09) and rvt.next_rate(edge, "low") == pytest.approx(0.01 / 3)
  widened = rvt.rate_table([_round({0.01: [4, None], 0.03: [2, 2]}), _round({0.09: [1, 1]}, diverged=(0.09,))],
                           0.25, 5)
  assert rvt.choose_rate(widened) == (0.03, None)  # the faster-looking 0.09 diverged: 0.03 is interior
  assert rvt.choose_rate(rvt.rate_table([_round({0.1: [2]}, diverged=(0.1,))], 0.25, 5)) == (None, "low")
  assert rvt.next_rate(rvt.rate_table([_round({0.1: [2]})], 0.25, 5), "low") == pytest.approx(0.1 / 3)


def test_cuda_convnet_init_is_std_1e4_for_conv1_and_001_elsewhere():
  study = rvt.validate(_study("/x", init="cuda_convnet"))
  pop = rvt.create_population(study, "relu", [(0.01, 0), (0.01, 1)], np.zeros((2, 32, 32, 3), np.float32),
                              10)
  params = pop.state.params
  expected = {"conv1": 1e-4, "conv2": 0.01, "conv3": 0.01, "classifier": 0.01}
  for layer, std in expected.items():
    kernel = np.asarray(params[layer]["linear"]["kernel"])
    assert abs(kernel.std() / std - 1) < 0.05, (layer, kernel.std())
    assert not np.asarray(params[layer]["linear"]["bias"]).any()


def test_init_statistics_against_a_direct_computation():
  dataset = data.synthetic(image_shape=(32, 32, 3), train_size=64, validation_size=0)
  study = rvt.validate({**_study(None), "dataset": "synthetic", "data_dir": None})
  rows = {r["layer"]: r for r in rvt.init_statistics(study, "relu", dataset)}
  pop = rvt.create_population(study, "relu", [(1.0, 0)], dataset.train.images[:2], 10)
  params = rvt.population.member(pop, 0).params
  model = rvt.build_model("lecun_normal", "relu", 10)
  _, state = model.apply({"params": params}, dataset.train.images, mutable=["intermediates"])
  post = np.asarray(state["intermediates"]["conv2"]["post"][0])
  assert rows["conv2"]["saturated_or_dead"] == pytest.approx(np.mean(post <= 0))
  assert rows["conv2"]["output_std"] == pytest.approx(post.std(), rel=1e-5)
  assert rows["conv1"]["weight_std"] == pytest.approx(np.asarray(params["conv1"]["linear"]["kernel"]).std())
  assert rows["classifier"]["saturated_or_dead"] is None


def _records(errors, diverged_at=None):
  return [{"epoch": i + 1, "step": 10 * (i + 1), "train_error": e, "diverged": i + 1 == diverged_at,
           "cum_train_seconds": 2.0 * (i + 1)} for i, e in enumerate(errors)]


def _run(errors, target=0.25, **kw):
  return rvt.summarize_run({"records": _records(errors, **kw), "steps_per_epoch": 10}, "x", 0, 0.1, target, "d")


def test_epochs_to_target_is_the_first_epoch_at_or_below_it_and_ignores_diverged_records():
  assert rvt.epochs_to_target(_records([0.5, 0.25, 0.1]), 0.25) == 2
  assert rvt.epochs_to_target(_records([0.5, 0.3]), 0.25) is None
  assert rvt.epochs_to_target(_records([0.5, 0.1], diverged_at=2), 0.25) is None
  run = _run([0.5, 0.2, 0.3])
  assert (run["epochs_to_target"], run["steps_to_target"], run["seconds_to_target"]) == (2, 20, 4.0)
  assert (run["best_train_error"], run["best_epoch"], run["final_train_error"]) == (0.2, 2, 0.3)


def test_speedup_is_exact_a_bound_or_undetermined():
  fast, slow, never = _run([0.3, 0.2]), _run([0.5, 0.4, 0.3, 0.2]), _run([0.5, 0.4, 0.3])
  exact = rvt.summarize_speedup([slow, slow], [fast, _run([0.2])])
  assert [p["ratio"] for p in exact["per_seed"]] == [2.0, 4.0]
  assert (exact["mean"], exact["std"], exact["kind"]) == (3.0, pytest.approx(np.sqrt(2)), "exact")
  lower = rvt.summarize_speedup([slow, never], [fast, fast])  # never: 3 epochs run, so at least 4 / 2
  assert [p["kind"] for p in lower["per_seed"]] == ["exact", "lower_bound"]
  assert (lower["mean"], lower["kind"]) == (2.0, "lower_bound")
  upper = rvt.summarize_speedup([fast], [never])
  assert (upper["mean"], upper["kind"]) == (0.5, "upper_bound")
  assert rvt.summarize_speedup([never], [never])["mean"] is None
  mixed = rvt.summarize_speedup([never, fast], [fast, never])
  assert (mixed["mean"], mixed["kind"]) == (None, "undetermined")
  single = rvt.summarize_speedup([slow], [fast])
  assert (single["mean"], single["std"]) == (2.0, None)
  act = rvt.summarize_activation([fast, never])
  assert (act["epochs_to_target"], act["epochs_to_target_mean"], act["epochs_kind"]) == ([2, None], 3.0,
                                                                                          "lower_bound")
  assert act["seconds_to_target_mean"] is None and act["reached"] == 1


def test_a_member_that_stopped_at_the_target_keeps_the_records_up_to_it():
  records = _records([0.5, 0.2, 0.2, 0.1])
  assert rvt.trained(records, True, 0.25) == records[:2]
  assert rvt.trained(records, False, 0.25) == records and rvt.trained(records, True, 0.05) == records


def test_finished_depends_on_the_request():
  records = _records([0.5, 0.2])
  assert rvt.finished(records, 2, False, 0.25) and not rvt.finished(records, 3, False, 0.25)
  assert rvt.finished(records, 3, True, 0.25) and not rvt.finished(records[:1], 3, True, 0.25)
  assert rvt.finished(_records([0.5, 0.9], diverged_at=2), 5, False, 0.25)


@pytest.mark.parametrize("override, message", [
    ({"activations": ["relu", "nope"]}, "study.activations: unknown activation 'nope'"),
    ({"activations": ["relu", "relu"]}, "study.activations lists an activation twice"),
    ({"lr_grid": ["0.1", "fast"]}, "study.lr_grid entry 'fast' is not a number"),
    ({"lr_grid": [0.1, -1.0]}, "study.lr_grid entry must be > 0"),
    ({"target_error": 1.5}, "study.target_error must be in"),
    ({"max_epochs": 0}, "study.max_epochs must be > 0"),
    ({"subset": 10, "batch": 20}, "loop.batch_size 20 is larger than data.subset 10"),
    ({"optimizer": "lbfgs"}, "optimizer.name must be one of"),
    ({"init": "lsuv"}, "model.init='lsuv' is not supported here"),
    ({"init": "nope"}, "model.init must be one of"),
    ({"widen_rounds": -1}, "study.widen_rounds must be an integer >= 0"),
])
def test_validate_names_the_config_key(override, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    rvt.validate(_study("/nowhere", **override))
