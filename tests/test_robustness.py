"""Nothing lost, nothing mixed: one writer per workdir, checkpoints verified on restore with fallback, inputs
validated before anything is written, interrupts and resource limits reported in one line (real subprocesses)."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dlcore import checkpoint, data
from experiments import config_lib, train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--config.data.dataset=synthetic", "--config.model.hidden=(64,)", "--config.loop.batch_size=64",
        "--config.optimizer.learning_rate=0.05", "--config.schedule.name=constant", "--config.loop.log_every=10"]


def _trainer(workdir, *extra, preexec_fn=None):
  cmd = [sys.executable, "-m", "experiments.train", *BASE, f"--workdir={workdir}", *extra]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          preexec_fn=preexec_fn)


def _run(workdir, *extra, **kwargs):
  proc = _trainer(workdir, *extra, **kwargs)
  out, _ = proc.communicate(timeout=300)
  return proc.returncode, out


def _params(workdir):
  config = config_lib.load(str(workdir), "train")
  dataset = data.load("synthetic")
  template = train_lib.build_state(config, dataset, dataset.train.images[:64])
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    return ckpt.restore(template)[0]


def _wait_for(path, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline and not os.path.exists(path):
    time.sleep(0.05)
  assert os.path.exists(path), f"{path} never appeared"


def test_second_run_on_a_locked_workdir_exits_at_once_naming_the_holder(tmp_path):
  first = _trainer(tmp_path, "--config.loop.steps=3000", "--config.loop.checkpoint_every=0")
  _wait_for(tmp_path / ".lock")
  time.sleep(0.5)
  start = time.time()
  rc, out = _run(tmp_path, "--config.loop.steps=3000", "--config.optimizer.learning_rate=0.3")
  assert rc != 0 and f"--workdir {tmp_path} is in use by pid {first.pid} on host" in out, out
  assert len(out.strip().splitlines()) == 1 and time.time() - start < 60
  first.send_signal(signal.SIGTERM)
  out, _ = first.communicate(timeout=120)
  assert first.returncode == 75, out
  assert not (tmp_path / ".lock").exists()
  # the config on disk is the first run's: nothing of the refused run got in
  assert json.loads((tmp_path / "config.json").read_text())["optimizer"]["learning_rate"] == 0.05


def test_lock_of_a_dead_run_is_taken_over_with_a_message(tmp_path):
  killed = _trainer(tmp_path, "--config.loop.steps=3000", "--config.loop.checkpoint_every=0")
  _wait_for(tmp_path / ".lock")
  time.sleep(1.0)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert (tmp_path / ".lock").exists()  # left behind; the OS released the lock itself
  rc, out = _run(tmp_path, "--config.loop.steps=3000", "--config.loop.checkpoint_every=0", "--config.loop.steps=20")
  assert rc == 0, out
  assert f"taking over the lock of pid {killed.pid} on host" in out and "no longer running" in out


def _latest_data_file(workdir, step):
  files = glob.glob(str(workdir / "checkpoints" / str(step) / "state" / "ocdbt.process_0" / "d" / "*"))
  return max(files, key=os.path.getsize)


def test_damaged_checkpoints_are_moved_aside_and_the_newest_good_one_resumes_exactly(tmp_path):
  """The three newest checkpoints damaged three ways (bytes flipped in a data file, a truncated data file, an
  emptied manifest): each is moved aside in one line, and the run resumes from the newest good one."""
  args = ["--config.loop.eval_every=10", "--config.loop.keep_checkpoints=10"]
  rc, out = _run(tmp_path / "reference", "--config.loop.steps=70", *args)
  assert rc == 0, out
  work = tmp_path / "damaged"
  rc, out = _run(work, "--config.loop.steps=60", *args)
  assert rc == 0, out
  path = _latest_data_file(work, 60)
  raw = bytearray(open(path, "rb").read())
  for i in range(len(raw) // 3, len(raw) // 3 + 64):
    raw[i] ^= 0xFF
  open(path, "wb").write(bytes(raw))
  path = _latest_data_file(work, 50)
  os.truncate(path, os.path.getsize(path) // 2)
  open(work / "checkpoints" / "40" / "state" / "manifest.ocdbt", "w").close()

  rc, out = _run(work, "--config.loop.steps=70", *args)  # extends 60 -> 70 (constant schedule)
  assert rc == 0, out
  for step in (60, 50, 40):
    lines = [l for l in out.splitlines() if f"checkpoint {step} is unreadable" in l]
    assert len(lines) == 1 and "moved it to" in lines[0], out
    assert os.path.isdir(str(work / "checkpoints.corrupt" / str(step)))  # kept, not deleted
  assert "resumed from step 30" in out and "Traceback" not in out, out
  a, b = _params(tmp_path / "reference"), _params(work)
  for x, y in zip(jax.tree.leaves((a.params, a.opt_state)), jax.tree.leaves((b.params, b.opt_state))):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("args,message", [
    (["--workdir="], "--workdir is empty"),
    (["--config.loop.epochs=0", "--config.loop.steps=0"], "the run needs loop.steps > 0 or loop.epochs > 0"),
    (["--config.ensemble.members=('/no/such/run',)"], "ensemble.members: /no/such/run is not a finished run"),
    (["--config.model.hidden=abc"], "must be a positive integer, got 'abc'"),
    (["--config.optimizer.learning_rate=-1"], "learning_rate must be > 0"),
    (["--config.loop.keep_checkpoints=0"], "loop.keep_checkpoints must be > 0"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, args, message):
  workdir = tmp_path / "w"
  cmd_args = [a if not a.startswith("--workdir") else a for a in args]
  proc = subprocess.run([sys.executable, "-m", "experiments.train", *BASE,
                         *([f"--workdir={workdir}"] if not any(a.startswith("--workdir") for a in args) else []),
                         *cmd_args], cwd=ROOT, capture_output=True, text=True, timeout=120)
  out = proc.stdout + proc.stderr
  assert proc.returncode != 0 and message in out, out
  assert "Traceback" not in out
  assert not workdir.exists()


def test_workdir_that_is_a_file_or_holds_a_corrupt_config_is_named(tmp_path):
  (tmp_path / "file").write_text("x")
  rc, out = _run(tmp_path / "file", "--config.loop.steps=5")
  assert rc != 0 and "exists and is not a folder" in out and "Traceback" not in out
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.json").write_text("{not json")
  rc, out = _run(tmp_path / "run", "--config.loop.steps=5")
  assert rc != 0 and "holds a config.json that cannot be read" in out and "Traceback" not in out
  assert sorted(os.listdir(tmp_path / "run")) == ["config.json"]  # untouched, lock removed


def test_ctrl_c_stops_in_one_line_and_resumes(tmp_path):
  run = _trainer(tmp_path, "--config.loop.steps=3000", "--config.loop.checkpoint_every=0")
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) > 3):
    time.sleep(0.05)
  run.send_signal(signal.SIGINT)
  out, _ = run.communicate(timeout=120)
  assert run.returncode == 75 and "Traceback" not in out, out
  assert "SIGINT: stopped after step" in out and "re-run the same command to resume" in out


def test_file_size_limit_ends_in_one_line_naming_the_cause_and_the_last_good_step(tmp_path):
  import resource  # pylint: disable=g-import-not-at-top
  rc, out = _run(tmp_path / "probe", "--config.loop.steps=20", "--config.loop.eval_every=10")
  assert rc == 0, out
  ckpt_bytes = max(os.path.getsize(p) for p in glob.glob(str(tmp_path / "probe" / "checkpoints" / "**"),
                                                         recursive=True) if os.path.isfile(p))
  limit = ckpt_bytes // 2  # small files (config, metrics) fit; a checkpoint's data file does not
  rc, out = _run(tmp_path / "limited", "--config.loop.steps=20", "--config.loop.eval_every=10",
                 preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
  assert rc not in (0, 75), out
  errors = [l for l in out.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "File too large" in errors[0] and "last good checkpoint: step" in errors[0], out
  assert "Traceback" not in out and len(out.splitlines()) < 30, out
