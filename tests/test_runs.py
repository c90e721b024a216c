"""Runs a researcher can manage: config files and a run's own config.json as --config, one-line config errors,
SIGTERM stops that resume exactly, logs identical to an uninterrupted run's, extending and re-running a finished
run, TensorBoard without duplicate points."""

import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dlcore import checkpoint, data
from experiments import config_lib, train_lib
from experiments.configs import schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--config.data.dataset=synthetic", "--config.model.hidden=(64,)", "--config.loop.batch_size=64",
        "--config.optimizer.learning_rate=0.05", "--config.loop.log_every=10"]


def _trainer(workdir, *extra, devices=1, base=BASE):
  cmd = [sys.executable, "-m", "experiments.train", *base, f"--workdir={workdir}", *extra]
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _run(workdir, *extra, **kwargs):
  proc = _trainer(workdir, *extra, **kwargs)
  out, _ = proc.communicate(timeout=300)
  return proc.returncode, out


def _records(workdir, timing=False):
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return records if timing else [{k: v for k, v in r.items() if k != "images_per_sec"} for r in records]


def _params(workdir):
  config = config_lib.load(str(workdir), "train")
  dataset = data.load("synthetic")
  template = train_lib.build_state(config, dataset, dataset.train.images[:64])
  with checkpoint.Checkpointer(workdir / "checkpoints") as ckpt:
    return ckpt.restore(template)[0]


def _tensorboard_scalars(workdir):
  """(files, [(tag, step)] of every scalar, plugins) of the run's TensorBoard event files (TFRecord framing)."""
  from tensorboardX.proto import event_pb2
  points, plugins = [], set()
  files = glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))
  for path in files:
    with open(path, "rb") as f:
      while header := f.read(12):
        (length,) = struct.unpack("<Q", header[:8])
        event = event_pb2.Event.FromString(f.read(length))
        f.read(4)
        points += [(v.tag, event.step) for v in event.summary.value if v.HasField("simple_value")]
        plugins |= {v.metadata.plugin_data.plugin_name for v in event.summary.value if v.HasField("metadata")}
  return files, points, plugins


# --- config files -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fashion_mnist_mlp", "cifar_convnet", "resnet20", "activation_stats",
                                  "batchnorm_mnist", "dropout_mnist", "relu_vs_tanh", "sweep", "lr_finder",
                                  "sanity_checks", "transfer"])
def test_every_reference_config_loads_and_validates(name):
  binary = name if name in schema.SCHEMAS else "train"
  config = config_lib.load(os.path.join(config_lib.CONFIG_DIR, f"{name}.py"), binary)
  assert set(config.keys()) == set(schema.SCHEMAS[binary]().keys())
  if binary == "train":
    train_lib.validate(config)


def test_one_name_for_one_thing_across_binaries():
  """A key name that appears in several binaries' schemas sits in the same group everywhere ('name' excepted:
  each group's choice by name, model.name, optimizer.name, ...)."""
  where = {}
  for binary, make in schema.SCHEMAS.items():
    for path in config_lib.flat(make()):
      where.setdefault(path.split(".")[-1], set()).add(path)
  assert where.pop("name") == {"model.name", "loss.name", "optimizer.name", "schedule.name"}
  assert {k: v for k, v in where.items() if len(v) > 1} == {}


def test_config_json_round_trips(tmp_path):
  config = schema.train()
  config.model.update(name="resnet20", shortcut="zero_pad")
  config.schedule.update(name="piecewise", boundaries=(10, 20))
  config.ensemble.members = ("a", "b")
  (tmp_path / "config.json").write_text(json.dumps(config_lib.to_json_dict(config, "train")))
  loaded = config_lib.load(str(tmp_path), "train")
  assert loaded == config and loaded.schedule.boundaries == (10, 20)


@pytest.mark.parametrize("content,message", [
    (None, "config file {path} does not exist"),
    ("def get_config(:\n", "config file {path}: syntax error at line 1"),
    ("x = 1\n", "config file {path} does not define get_config()"),
    ("from experiments.configs import schema\ndef get_config():\n  c = schema.train().to_dict()\n"
     "  c['optimizer']['learning_rate'] = 'fast'\n  return c\n",
     "config file {path}: 'optimizer.learning_rate' must be float, got 'fast'"),
    ("def get_config():\n  return {'optimizer': {'lr': 0.1}}\n",
     "config file {path}: unknown key 'optimizer.lr'; valid keys here: optimizer.clip_norm, "
     "optimizer.initial_momentum, optimizer.learning_rate"),
])
def test_bad_config_files_fail_in_one_line_naming_file_and_key(tmp_path, content, message):
  path = tmp_path / "cfg.py"
  if content is not None:
    path.write_text(content)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load(str(path), "train")
  assert message.format(path=path) in str(e.value) and "\n" not in str(e.value)


def test_config_json_of_another_binary_is_refused(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(config_lib.to_json_dict(schema.batchnorm_mnist(), "batchnorm_mnist")))
  with pytest.raises(config_lib.ConfigError, match="was written by the batchnorm_mnist binary, not train"):
    config_lib.load(str(tmp_path / "config.json"), "train")


@pytest.mark.parametrize("args,message", [
    (["--config.optimizer.lr=0.1"], "--config.optimizer.lr: no key 'optimizer.lr' in the train config; valid keys "
                                    "here: optimizer.clip_norm"),
    (["--config=/no/such.py"], "config file /no/such.py does not exist"),
    (["--config.loop.steps=many"], "--config.loop.steps=many"),
    (["--config.loss.hinge_delta=2.0"], "loss.hinge_delta=2.0 has no effect: loss.name is 'cross_entropy'"),
    (["--config.schedule.step_size=5"], "schedule.step_size has no effect with schedule.name='warmup_cosine'"),
    (["--config.loop.steps=0", "--config.loop.epochs=-1"], "the run needs loop.steps > 0 or loop.epochs > 0"),
    (["--config.optimizer.name=adam"], "optimizer.momentum"),  # momentum 0.9 is the schema default: fine
])
def test_trainer_refuses_bad_config_in_one_line_and_writes_nothing(tmp_path, args, message):
  steps = [] if any(a.startswith("--config.loop.steps") for a in args) else ["--config.loop.steps=3"]
  rc, out = _run(tmp_path / "w", *steps, *args)
  if args == ["--config.optimizer.name=adam"]:
    assert rc == 0, out
    return
  assert rc != 0 and message in out, out
  assert "Traceback" not in out
  assert not (tmp_path / "w").exists()


# --- preemption, logs, extension ----------------------------------------------------------------------------


@pytest.mark.parametrize("devices", [1, 4])
def test_sigterm_checkpoints_and_resume_matches_an_uninterrupted_run(tmp_path, devices):
  args = ["--config.loop.steps=400", "--config.loop.eval_every=150", "--config.loop.checkpoint_every=0",
          "--config.model.batchnorm=before", "--config.model.keep_prob=0.8"]
  rc, out = _run(tmp_path / "reference", *args, devices=devices)
  assert rc == 0, out

  killed = _trainer(tmp_path / "killed", *args, devices=devices)
  metrics = tmp_path / "killed" / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline:
    if metrics.exists() and any(json.loads(l)["step"] >= 200 for l in metrics.read_text().splitlines()[:-1]):
      break
    time.sleep(0.05)
  killed.send_signal(signal.SIGTERM)
  out, _ = killed.communicate(timeout=120)
  assert killed.returncode == 75, out
  stopped = int(out.split("stopped after step ")[1].split()[0])
  assert 200 <= stopped < 400 and "re-run the same command to resume" in out
  assert "Traceback" not in out
  with checkpoint.Checkpointer(tmp_path / "killed" / "checkpoints") as ckpt:
    assert ckpt.latest_step() == stopped  # not a multiple of the eval or log interval: saved for the stop

  rc, out = _run(tmp_path / "killed", *args, devices=devices)
  assert rc == 0 and f"resumed from step {stopped}" in out, out
  a, b = _params(tmp_path / "reference"), _params(tmp_path / "killed")
  for x, y in zip(jax.tree.leaves((a.params, a.batch_stats, a.opt_state)),
                  jax.tree.leaves((b.params, b.batch_stats, b.opt_state))):
    np.testing.assert_array_equal(x, y)
  # the logs: the same records in the same order (timings aside), one events file, no duplicate points
  assert _records(tmp_path / "killed") == _records(tmp_path / "reference")
  files, points, plugins = _tensorboard_scalars(tmp_path / "killed")
  assert len(files) == 1 and len(points) == len(set(points))
  assert "hparams" in plugins
  steps = [s for tag, s in points if tag == "train/loss"]
  assert steps == sorted(steps) == list(range(10, 401, 10))


def test_restart_from_scratch_drops_the_killed_runs_records(tmp_path):
  killed = _trainer(tmp_path, "--config.loop.steps=400", "--config.loop.checkpoint_every=0",
                    "--config.loop.eval_every=0", "--config.loop.epochs=5.0")
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) > 3):
    time.sleep(0.05)
  killed.send_signal(signal.SIGKILL)  # before any checkpoint: the restart begins at step 0
  killed.wait()
  with checkpoint.Checkpointer(tmp_path / "checkpoints") as ckpt:
    if ckpt.latest_step() is not None:
      pytest.skip("a checkpoint was written before the kill")
  rc, out = _run(tmp_path, "--config.loop.steps=400", "--config.loop.checkpoint_every=0",
                 "--config.loop.eval_every=0", "--config.loop.epochs=5.0")
  assert rc == 0, out
  steps = [r["step"] for r in _records(tmp_path) if r["split"] == "train"]
  assert steps == list(range(10, 401, 10))


def test_finished_run_can_be_extended_and_rerun_changes_nothing(tmp_path):
  constant = ["--config.schedule.name=constant"]
  rc, out = _run(tmp_path / "long", "--config.loop.steps=60", *constant)
  assert rc == 0, out
  rc, out = _run(tmp_path / "short", "--config.loop.steps=30", *constant)
  assert rc == 0, out
  files = lambda: {p: os.stat(p).st_mtime_ns for p in glob.glob(str(tmp_path / "short" / "**"), recursive=True)
                   if os.path.isfile(p)}
  before = files()
  rc, out = _run(tmp_path / "short", "--config.loop.steps=30", *constant)
  assert rc == 0 and "holds a finished run with this config; nothing to do" in out and "test accuracy" in out
  assert files() == before

  rc, out = _run(tmp_path / "short", "--config.loop.steps=60", *constant)  # extend 30 -> 60
  assert rc == 0 and "resumed from step 30" in out, out
  a, b = _params(tmp_path / "long"), _params(tmp_path / "short")
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(x, y)
  train = lambda w: [r for r in _records(w) if r["split"] == "train"]
  assert train(tmp_path / "short") == train(tmp_path / "long")
  assert [r["step"] for r in _records(tmp_path / "short") if r["split"] == "test"] == [60]  # step 30's went


def test_extending_a_length_dependent_schedule_needs_extend_schedule(tmp_path):
  rc, out = _run(tmp_path, "--config.loop.steps=20")  # warmup_cosine: depends on the total
  assert rc == 0, out
  rc, out = _run(tmp_path, "--config.loop.steps=40")
  assert rc != 0 and "depends on the run's length; pass --extend_schedule" in out
  rc, out = _run(tmp_path, "--config.loop.steps=40", "--extend_schedule")
  assert rc == 0 and "resumed from step 20" in out, out
  lrs = [r["learning_rate"] for r in _records(tmp_path) if r["split"] == "train"]
  assert lrs[2] > lrs[1]  # steps 21-30 follow the longer cosine: a higher rate than steps 11-20 had


def test_run_can_be_repeated_from_its_workdir(tmp_path):
  rc, out = _run(tmp_path / "a", "--config.loop.steps=20", "--config.seed=3")
  assert rc == 0, out
  rc, out = _run(tmp_path / "b", f"--config={tmp_path / 'a'}", base=[])
  assert rc == 0, out
  assert _records(tmp_path / "a") == _records(tmp_path / "b")
  assert (tmp_path / "a" / "config.json").read_text() == (tmp_path / "b" / "config.json").read_text()


def test_a_study_repeats_from_its_own_config_json(tmp_path):
  cmd = [sys.executable, "-m", "experiments.activation_stats", "--config.model.hidden=(20, 20)",
         "--config.study.num_inputs=50", "--config.study.input_dim=20", "--config.study.cases=('tanh:lsuv',)"]
  first = subprocess.run(cmd + [f"--workdir={tmp_path / 'a'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert first.returncode == 0, first.stderr
  again = subprocess.run([sys.executable, "-m", "experiments.activation_stats", f"--config={tmp_path / 'a'}",
                          f"--workdir={tmp_path / 'b'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert again.returncode == 0, again.stderr
  a, b = (json.loads((tmp_path / w / "results.json").read_text()) for w in ("a", "b"))
  assert a["layers"] == b["layers"] and a["config"] == b["config"]
  other = subprocess.run([sys.executable, "-m", "experiments.train", f"--config={tmp_path / 'a'}",
                          f"--workdir={tmp_path / 'c'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert other.returncode != 0 and "written by the activation_stats binary, not train" in other.stderr


def test_shorter_run_is_not_an_extension_and_extension_interrupted_is_not_finished(tmp_path):
  constant = ["--config.schedule.name=constant"]
  rc, out = _run(tmp_path, "--config.loop.steps=30", *constant)
  assert rc == 0, out
  rc, out = _run(tmp_path, "--config.loop.steps=20", *constant)
  assert rc != 0 and "does not extend the run" in out
  # an extension starts: the old results go, so a later re-run cannot mistake it for finished
  proc = _trainer(tmp_path, "--config.loop.steps=100000", *constant)
  deadline = time.time() + 240
  while time.time() < deadline and (tmp_path / "results.json").exists():
    time.sleep(0.05)
  time.sleep(1.0)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 75, out
  assert not (tmp_path / "results.json").exists()
  assert train_lib.check_workdir(str(tmp_path), config_lib.load(str(tmp_path), "train")) == "resume"


def test_missing_schedule_parameter_is_refused_before_data(tmp_path):
  rc, out = _run(tmp_path / "w", "--config.loop.steps=5", "--config.schedule.name=step",
                 "--config.data.dataset=cifar10")  # cifar10 is absent here: refused before looking for it
  assert rc != 0 and "schedule: schedule 'step' needs params ['step_size']" in out, out
  assert not (tmp_path / "w").exists()
