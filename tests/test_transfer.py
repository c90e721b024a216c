"""Transfer learning (dlcore.transfer and the trainer's transfer group): updates per label against numpy, frozen
layers untouched by gradients, weight decay and BatchNorm, re-initialised layers equal to a fresh init, errors."""

import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from dlcore import checkpoint, data, optim, transfer
from experiments import train_lib
from experiments.configs import schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = np.random.default_rng(0)


def _tree(*names):
  return {n: {"linear": {"kernel": RNG.standard_normal((3, 2)).astype(np.float32),
                         "bias": RNG.standard_normal(2).astype(np.float32)}} for n in names}


def _step(tx, params, grads):
  updates, _ = tx.update(grads, tx.init(params), params)
  return optax.apply_updates(params, updates)


def test_sgd_step_per_label_matches_numpy():
  params, grads = _tree("layer0", "layer1", "classifier"), _tree("layer0", "layer1", "classifier")
  labels = transfer.labels(params, reinit=("classifier",), freeze=("layer0",))
  tx = transfer.optimizer(lambda lr: optim.optimizer("sgd", lr), 0.1, labels, lr_scale=0.25)
  new = _step(tx, params, grads)
  for key in ("kernel", "bias"):
    p = {n: np.asarray(params[n]["linear"][key], np.float64) for n in params}
    g = {n: np.asarray(grads[n]["linear"][key], np.float64) for n in params}
    assert np.array_equal(new["layer0"]["linear"][key], params["layer0"]["linear"][key])  # frozen: bit for bit
    np.testing.assert_allclose(new["layer1"]["linear"][key], p["layer1"] - 0.025 * g["layer1"], rtol=1e-6)
    np.testing.assert_allclose(new["classifier"]["linear"][key], p["classifier"] - 0.1 * g["classifier"], rtol=1e-6)


def test_decoupled_weight_decay_spares_frozen_layers_and_scales_with_the_rate():
  params = _tree("layer0", "layer1", "classifier")
  zero = jax.tree.map(np.zeros_like, params)
  labels = transfer.labels(params, freeze=("layer0",))
  make = lambda lr: optim.optimizer("momentum", lr, weight_decay=0.5, weight_decay_mode="decoupled")
  new = _step(transfer.optimizer(make, lambda t: 0.2, labels, lr_scale=0.5), params, zero)
  assert np.array_equal(new["layer0"]["linear"]["kernel"], params["layer0"]["linear"]["kernel"])
  for name, lr in (("layer1", 0.1), ("classifier", 0.2)):  # x -= lr_t * wd * x on kernels only
    kernel = np.asarray(params[name]["linear"]["kernel"], np.float64)
    np.testing.assert_allclose(new[name]["linear"]["kernel"], kernel * (1 - lr * 0.5), rtol=1e-6)
    assert np.array_equal(new[name]["linear"]["bias"], params[name]["linear"]["bias"])


def test_clipping_sees_the_trained_layers_only():
  params, grads = _tree("layer0", "classifier"), _tree("layer0", "classifier")
  grads["layer0"] = jax.tree.map(lambda g: 1e3 * g, grads["layer0"])  # would dominate the global norm
  labels = transfer.labels(params, freeze=("layer0",))
  tx = transfer.optimizer(lambda lr: optim.optimizer("sgd", lr), 1.0, labels, clip_norm=0.01)
  new = _step(tx, params, grads)
  g = np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(grads["classifier"])])
  scale = min(1.0, 0.01 / np.linalg.norm(g))
  np.testing.assert_allclose(new["classifier"]["linear"]["kernel"],
                             params["classifier"]["linear"]["kernel"] - scale * grads["classifier"]["linear"]["kernel"],
                             rtol=1e-5)
  assert np.array_equal(new["layer0"]["linear"]["kernel"], params["layer0"]["linear"]["kernel"])


def test_layer_and_shape_errors_name_what_is_allowed():
  params = _tree("layer0", "classifier")
  with pytest.raises(ValueError, match=r"freeze: no layer 'conv9' in the model; its layers: layer0, classifier"):
    transfer.labels(params, freeze=("conv9",))
  with pytest.raises(ValueError, match="freeze and reinit both name 'classifier'"):
    transfer.labels(params, freeze=("classifier",))
  source = {"params": {**_tree("layer0"), "classifier": {"linear": {"kernel": np.zeros((3, 7)),
                                                                    "bias": np.zeros(7)}}}}
  with pytest.raises(ValueError, match=r"layer 'classifier'.*\(7,\) in the source and \(2,\) in this model"):
    transfer.transfer_variables(source, {"params": params}, reinit=())
  merged = transfer.transfer_variables(source, {"params": params})
  assert np.array_equal(merged["params"]["layer0"]["linear"]["kernel"], source["params"]["layer0"]["linear"]["kernel"])
  assert merged["params"]["classifier"] is params["classifier"]


# --- the trainer ---------------------------------------------------------------------------------------------


def _config(workdir=None, **transfer_keys):
  config = schema.train()
  config.data.update(dataset="synthetic", classes=(5, 6, 7, 8, 9) if workdir else (0, 1, 2, 3, 4))
  config.model.update(hidden=(16, 8), batchnorm="before")
  config.loop.update(batch_size=32, steps=6, log_every=3)
  config.transfer.update(init_from=workdir, **transfer_keys)
  return config


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("source"))
  train_lib.train_and_evaluate(_config(), workdir, log=lambda m: None)
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    return workdir, ckpt.restore_variables()


def _arrays_equal(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


def test_start_copies_the_source_and_reinit_layers_equal_a_fresh_init(source_run):
  workdir, source = source_run
  config = _config(workdir)
  config.seed = 7
  dataset = train_lib.load_dataset(config)
  fresh = train_lib.build_state(config, dataset, dataset.train.images[:32])
  start = train_lib.transfer_start(config, fresh, log=lambda m: None)
  for name in ("layer0", "layer1"):
    assert _arrays_equal(start.params[name], source["params"][name])
    assert _arrays_equal(start.batch_stats[name], source["batch_stats"][name])
  assert _arrays_equal(start.params["classifier"], fresh.params["classifier"])  # the run's own seed
  assert not _arrays_equal(start.params["layer0"], fresh.params["layer0"])


def test_frozen_layers_and_their_statistics_stay_bit_identical_and_a_resume_restores_its_own(source_run, tmp_path):
  workdir, source = source_run
  run = str(tmp_path / "frozen")
  train_lib.train_and_evaluate(_config(workdir, freeze=("layer0",), lr_scale=0.5), run, log=lambda m: None)
  with checkpoint.Checkpointer(os.path.join(run, "checkpoints")) as ckpt:
    assert ckpt.latest_step() == 6
    after = ckpt.restore_variables()
  assert _arrays_equal(after["params"]["layer0"], source["params"]["layer0"])
  assert _arrays_equal(after["batch_stats"]["layer0"], source["batch_stats"]["layer0"])
  assert not _arrays_equal(after["params"]["layer1"], source["params"]["layer1"])  # transferred, trained
  assert not _arrays_equal(after["batch_stats"]["layer1"], source["batch_stats"]["layer1"])
  longer, messages = _config(workdir, freeze=("layer0",), lr_scale=0.5), []
  longer.loop.steps = 9  # extended: the run resumes from its own step-6 checkpoint, not from the source
  train_lib.train_and_evaluate(longer, run, log=messages.append)
  assert any(m.startswith("resumed from step 6") for m in messages)
  assert not any(m.startswith("transfer:") for m in messages)
  with checkpoint.Checkpointer(os.path.join(run, "checkpoints")) as ckpt:
    assert _arrays_equal(ckpt.restore_variables(9)["params"]["layer0"], source["params"]["layer0"])


def test_transfer_config_errors_before_any_work(source_run, tmp_path):
  workdir, _ = source_run
  cases = [(_config(None, freeze=("layer0",)), r"transfer.freeze=\('layer0',\) has no effect: transfer.init_from"),
           (_config(str(tmp_path)), "holds no config.json"),
           (_config(workdir, freeze=("fc9",)), r"transfer.freeze: no layer 'fc9' in the model; its layers: "
                                              "classifier, layer0, layer1"),
           (_config(workdir, freeze=("layer0", "layer1"), lr_scale=0.1), "lr_scale=0.1 has no effect")]
  for config, message in cases:
    with pytest.raises(ValueError, match=message):
      train_lib.validate(config)
  config = _config(workdir, reinit=())
  config.data.classes = (5, 6, 7)  # 3 classes against the source's 5: the classifier cannot be copied
  dataset = train_lib.load_dataset(config)
  state = train_lib.build_state(config, dataset, dataset.train.images[:32])
  with pytest.raises(ValueError, match=r"classifier/linear/bias has shape \(5,\) in the source and \(3,\)"):
    train_lib.transfer_start(config, state)


def test_init_from_flag_and_config_key_must_agree(tmp_path):
  cmd = [sys.executable, "-m", "experiments.train", "--config.data.dataset=synthetic", f"--workdir={tmp_path / 'w'}",
         "--init_from=/a", "--config.transfer.init_from=/b"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1 and "--init_from=/a and --config.transfer.init_from=/b disagree" in out.stderr
  assert not (tmp_path / "w").exists()


def test_select_classes_relabels_and_balances():
  dataset = data.synthetic(train_size=400, test_size=200, validation_size=50)
  sub = data.select_classes(dataset, (7, 2), per_class=5, seed=3)
  assert sub.num_classes == 2 and sub.class_names == ("blob7", "blob2")
  assert np.array_equal(np.bincount(sub.train.labels), [5, 5])
  for split, orig in ((sub.test, dataset.test), (sub.validation, dataset.validation)):
    keep = np.isin(orig.labels, [7, 2])
    assert np.array_equal(split.images, orig.images[keep])
    assert np.array_equal(split.labels, np.where(orig.labels[keep] == 7, 0, 1))
  index = [np.flatnonzero(np.all(dataset.train.images == x, axis=(1, 2, 3)))[0] for x in sub.train.images]
  assert index == sorted(index)  # the original order
  again = data.select_classes(dataset, (7, 2), per_class=5, seed=3)
  assert np.array_equal(again.train.images, sub.train.images)
  assert not np.array_equal(data.select_classes(dataset, (7, 2), per_class=5, seed=4).train.images, sub.train.images)
  with pytest.raises(ValueError, match=r"per_class 500 is more than the \d+ training examples of class 7"):
    data.select_classes(dataset, (7, 2), per_class=500)
  with pytest.raises(ValueError, match=r"classes must be distinct labels in \[0, 9\]"):
    data.select_classes(dataset, (7, 10))
