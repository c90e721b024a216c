"""The binaries as a user meets them: the trainer's model flags take effect or are refused for every model, the
installed layout claims no generic top-level name, and every console script prints its full --help."""

import functools
import os
import subprocess
import sys
import sysconfig

import jax
import numpy as np
import pytest

from dlcore import models
from experiments import train_lib
from experiments.configs import schema

# A non-default value for every model-related trainer key.
CHANGES = {"hidden": (32,), "activation": "tanh", "init": "glorot_uniform", "init_scale": 0.5,
           "batchnorm": "after", "bn_momentum": 0.5, "bn_running_var": "unbiased", "keep_prob": 0.5,
           "input_keep_prob": 0.8, "dropout_mode": "original", "shortcut": "zero_pad", "dtype": "bfloat16"}
# What a change needs to be able to act at all (dropout_mode needs dropout; the bn_* keys need BatchNorm).
NEEDS = {"dropout_mode": {"keep_prob": 0.5}, "bn_momentum": {"batchnorm": "before"},
         "bn_running_var": {"batchnorm": "before"}}


def _config(name, **model):
  config = schema.train()
  config.model.update(name=name, **model)
  return config


@functools.lru_cache(maxsize=None)
def _base_behaviour(name, needs):
  return _behaviour(_config(name, **dict(needs)))


def _behaviour(config):
  """Params, train-mode outputs and running statistics after one train-mode call, eval-mode outputs."""
  model = train_lib.build_model(config, 10)
  x = jax.random.normal(jax.random.key(0), (2, 28, 28, 3))
  variables = model.init(jax.random.key(1), x)
  train, state = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"])
  return jax.tree.map(np.asarray, (variables, train, state, model.apply(variables, x, train=False)))


def _same(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb))


def test_change_table_covers_every_model_key():
  assert set(CHANGES) == set(train_lib.MODEL_KEYS)


@pytest.mark.parametrize("name", ["mlp", "lenet5", "cifar_convnet", "resnet8"])
@pytest.mark.parametrize("key", sorted(CHANGES))
def test_every_model_flag_takes_effect_or_is_refused(name, key):
  changed = _config(name, **{**NEEDS.get(key, {}), key: CHANGES[key]})
  try:
    after = _behaviour(changed)
  except ValueError as e:
    assert key in str(e), f"the error must name {key}: {e}"
    assert not (key in ("activation", "init", "keep_prob", "dtype")), f"{name} must take {key}"
    return
  base = _base_behaviour(name, tuple(sorted(NEEDS.get(key, {}).items())))
  assert not _same(base, after), f"{key}={CHANGES[key]!r} changed nothing for {name}"


@pytest.mark.parametrize("key,value,needs", [("dropout_mode", "original", "keep_prob is 1"),
                                             ("bn_momentum", 0.5, "no BatchNorm"),
                                             ("bn_running_var", "unbiased", "no BatchNorm")])
def test_options_without_effect_in_this_configuration_are_refused(key, value, needs):
  with pytest.raises(ValueError, match=f"{key}=.* has no effect: .*{needs}"):
    train_lib.build_model(_config("mlp", **{key: value}), 10)


def test_resnet_keeps_its_batchnorm_when_the_trainer_leaves_batchnorm_unset():
  assert train_lib.build_model(_config("resnet20"), 10).batchnorm == "before"
  with pytest.raises(ValueError, match=r"model.hidden=\(128,\) has no effect on model 'resnet20'"):
    train_lib.build_model(_config("resnet20", hidden=(128,)), 10)


def test_installed_binaries_do_not_claim_the_name_experiments(tmp_path):
  user = tmp_path / "experiments"
  user.mkdir()
  (user / "__init__.py").write_text("OWNER = 'the user'\n")
  code = ("import experiments, dlcore, dlcore_experiments.train as t; "
          "print(experiments.OWNER); print(t.__name__)")
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": ""})
  assert out.returncode == 0, out.stderr
  assert out.stdout.split("\n")[:2] == ["the user", "dlcore_experiments.train"]
  elsewhere = subprocess.run([sys.executable, "-c", "import experiments"], cwd=tmp_path / "experiments",
                             capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": ""})
  assert "No module named 'experiments'" in elsewhere.stderr  # dlcore installs no package of that name


SCRIPTS = {"dlcore-train": "--extend_schedule", "dlcore-activation-stats": "cs231n",
           "dlcore-batchnorm-mnist": "Ioffe & Szegedy", "dlcore-dropout-mnist": "Srivastava et al. 2014",
           "dlcore-relu-vs-tanh": "Krizhevsky",
           "dlcore-lr-finder": "study.stop_factor", "dlcore-sweep": "Coarse-to-fine",
           "dlcore-visualize": "penultimate features", "dlcore-sanity-checks": "babysitting",
           "dlcore-transfer": "finetune"}
# The flags a script's --help must list; the others take --config and --workdir.
HELP_FLAGS = {"dlcore-visualize": ("--run", "--out", "--embedding")}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_prints_full_help(script, tmp_path):
  path = os.path.join(sysconfig.get_path("scripts"), script)
  out = subprocess.run([path, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert out.returncode in (0, 1), out.stderr  # absl's --help exits with 1
  assert SCRIPTS[script] in out.stdout
  assert all(flag in out.stdout for flag in HELP_FLAGS.get(script, ("--workdir", "--config")))
  assert len(out.stdout.splitlines()) > 15


def test_activation_stats_refuses_single_case_keys_with_compare(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, "-m", "experiments.activation_stats", "--config.model.activation=relu",
         f"--workdir={tmp_path / 'w'}"]  # the default config compares the lecture's cases
  out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "model.activation would be ignored with study.compare=True" in out.stderr
  assert not (tmp_path / "w").exists()
