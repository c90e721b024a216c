"""The Ioffe & Szegedy Fig. 1 binary: end to end on synthetic data, percentiles against a numpy forward pass."""

import csv
import dataclasses
import gzip
import json
import os
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest

from dlcore import data, optim, state as state_lib
from experiments import batchnorm_mnist as bm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def numpy_pre(variables, images, layer_index, bn_stats):
  """The sigmoid input of hidden layer `layer_index` in float64; BatchNorm (if any) with the batch's own (biased)
  statistics or with its running averages."""
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  batch_stats = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["batch_stats"])
  h = np.asarray(images, np.float64).reshape(len(images), -1)
  for i in range(layer_index + 1):
    p = params[f"layer{i}"]
    z = h @ p["linear"]["kernel"] + p["linear"].get("bias", 0.0)
    if "bn_before" in p:
      bn = p["bn_before"]["bn"]
      running = batch_stats[f"layer{i}"]["bn_before"]["bn"]
      mean, var = (z.mean(0), z.var(0)) if bn_stats == "batch" else (running["mean"], running["var"])
      z = (z - mean) / np.sqrt(var + 1e-5) * bn["scale"] + bn["bias"]
    h = _sigmoid(z)
  return z


@pytest.mark.parametrize("batchnorm,bn_stats", [("none", "batch"), ("before", "batch"), ("before", "running")])
def test_recorder_matches_numpy_percentiles_of_the_unit(batchnorm, bn_stats):
  images = data.synthetic(train_size=20, test_size=300).test.images
  model = bm.build_model(batchnorm, init_scale=0.5)
  state = state_lib.create(model, optim.optimizer("sgd", 0.1), images[:60], seed=3)
  # Perturb every variable (biases, BN scale/offset, running mean/var) so each one matters.
  leaves, tree = jax.tree.flatten(state.variables())
  keys = jax.random.split(jax.random.key(1), len(leaves))
  noisy = [leaf + 0.3 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
  variables = jax.tree.unflatten(tree, noisy)
  if batchnorm == "before":
    for i in range(3):
      bn = variables["batch_stats"][f"layer{i}"]["bn_before"]["bn"]
      bn["var"] = np.abs(np.asarray(bn["var"])) + 0.1
  unit = 7
  got = bm.make_percentile_recorder(model, images, unit, bn_stats=bn_stats)(variables)
  pre = numpy_pre(variables, images, 2, bn_stats)
  expected = np.percentile(pre[:, unit], bm.PERCENTILES)
  np.testing.assert_allclose([got["p15"], got["p50"], got["p85"]], expected, rtol=1e-4, atol=1e-4)
  assert got["p15"] <= got["p50"] <= got["p85"]
  other = np.percentile(pre[:, unit + 1], bm.PERCENTILES)
  assert np.max(np.abs(other - expected)) > 1e-2  # the units are distinguishable, so the right one was read


def test_recorder_rejects_a_unit_outside_the_layer():
  images = data.synthetic(train_size=20, test_size=10).test.images
  model = bm.build_model("none", 1.0)
  state = state_lib.create(model, optim.optimizer("sgd", 0.1), images, seed=0)
  with pytest.raises(ValueError, match="unit must be in"):
    bm.make_percentile_recorder(model, images, 100)(state.variables())


def test_both_nets_start_from_the_same_kernels():
  images = data.synthetic(train_size=20, test_size=10).test.images
  tx = optim.optimizer("sgd", 0.1)
  plain = state_lib.create(bm.build_model("none", 1.0), tx, images, seed=5).params
  bn = state_lib.create(bm.build_model("before", 1.0), tx, images, seed=5).params
  for name in ("layer0", "layer1", "layer2", "classifier"):
    np.testing.assert_array_equal(plain[name]["linear"]["kernel"], bn[name]["linear"]["kernel"])


def test_validate_names_the_config_key():
  config = dict(dataset="synthetic", data_dir=None, steps=10, batch=60, eval_every=5, learning_rate=0.1,
                init_scale=1.0, log_every=0, seed=0, unit=0, optimizer="sgd", momentum=0.9, percentile_bn="batch",
                num_devices=None, resident=True, steps_per_call=0)
  bm.validate(config)
  for key, value, match in [("unit", 100, "study.unit"), ("steps", 0, "loop.steps"),
                            ("eval_every", -1, "loop.eval_every"), ("init_scale", 0.0, "model.init_scale"),
                            ("data_dir", "/x", "data.data_dir"), ("momentum", 0.5, "optimizer.momentum.*no effect"),
                            ("percentile_bn", "x", "study.percentile_bn"), ("dataset", "cifar10", "data.dataset"),
                            ("steps_per_call", -1, "loop.steps_per_call")]:
    with pytest.raises(ValueError, match=match):
      bm.validate({**config, key: value})


def _write_idx(path, array):
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_missing_mnist_falls_back_to_fashion_mnist_and_says_so(tmp_path):
  folder = tmp_path / "fashion_mnist"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for stem, n in (("train", 40), ("t10k", 20)):
    _write_idx(folder / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
    _write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", np.arange(n) % 10)
  messages = []
  dataset, note = bm.load_dataset("mnist", str(tmp_path), download=False, log=messages.append)
  assert dataset.name == "fashion_mnist" and len(dataset.train) == 40 and "fashion_mnist" in dataset.source
  assert "MNIST was not found" in note and "Fashion-MNIST" in note and messages == [f"NOTE: {note}"]


def test_fashion_mnist_files_passed_as_mnist_are_recognised():
  labels = np.repeat(np.arange(10), 6000)
  fake = data.Dataset(name="mnist", train=data.Split(np.zeros((60000, 1, 1, 1), np.float32), labels),
                      validation=None, test=data.Split(np.zeros((10000, 1, 1, 1), np.float32),
                                                       np.repeat(np.arange(10), 1000)),
                      num_classes=10, class_names=tuple("0123456789"), source="mnist from IDX files in /x")
  assert bm._looks_like_fashion_mnist(fake)
  unbalanced = dataclasses.replace(fake, train=data.Split(fake.train.images, np.sort(labels % 7)))
  assert not bm._looks_like_fashion_mnist(unbalanced)


def test_binary_end_to_end_on_synthetic(tmp_path):
  cmd = [sys.executable, "-m", "experiments.batchnorm_mnist", "--config.data.dataset=synthetic",
         "--config.loop.steps=50", "--config.loop.eval_every=20", "--config.loop.log_every=20",
         "--config.study.unit=3", "--config.study.percentile_bn=running", f"--workdir={tmp_path}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out
  assert "ETA" in out and "BN reaches higher accuracy sooner" in out and "Sigmoid-input drift" in out
  assert "acc with BN" in out and "p50 without BN" in out

  results = json.loads((tmp_path / "results.json").read_text())
  assert results["dataset"] == "synthetic" and results["data_source"].startswith("synthetic")
  assert results["layer"] == "layer2" and results["unit"] == 3 and results["data_note"] is None
  assert "running averages" in results["percentiles_over"]
  assert set(results["nets"]) == {"no_bn", "bn"}
  for key, net in results["nets"].items():
    records = net["records"]
    assert [r["step"] for r in records] == [0, 20, 40, 50]
    for r in records:
      assert set(r) == {"step", "test_accuracy", "test_loss", "p15", "p50", "p85"}
      assert 0.0 <= r["test_accuracy"] <= 1.0 and r["p15"] <= r["p50"] <= r["p85"]
    assert results["final_test_accuracy"][key] == records[-1]["test_accuracy"]
  # At initialisation BatchNorm in eval mode (running mean 0, var 1, scale 1, offset 0) is the identity, so the
  # same kernels (same seed) give the same sigmoid inputs.
  start = [results["nets"][k]["records"][0] for k in ("no_bn", "bn")]
  np.testing.assert_allclose([start[0][p] for p in ("p15", "p50", "p85")],
                             [start[1][p] for p in ("p15", "p50", "p85")], rtol=1e-4, atol=1e-5)
  assert {"bn_higher_and_sooner", "bn_steadier_p50_second_half", "drift", "text"} <= set(results["verdict"])
  assert set(results["verdict"]["drift"]) == {"no_bn", "bn"}

  with open(tmp_path / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["net"], int(r["step"])) for r in rows] == [(k, s) for k in ("no_bn", "bn") for s in (0, 20, 40, 50)]
  assert float(rows[-1]["p50"]) == results["nets"]["bn"]["records"][-1]["p50"]
  metrics = [json.loads(line) for line in (tmp_path / "bn" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in metrics if r["split"] == "sigmoid_input"] == [0, 20, 40, 50]
  assert json.loads((tmp_path / "config.json").read_text())["loop"]["steps"] == 50
  assert (tmp_path / "fig1.png").stat().st_size > 10_000
