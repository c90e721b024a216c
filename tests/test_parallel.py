"""dlcore.parallel: the mesh, sharded batches, compiled steps and multi-process runs.

Multi-device checks run tests/parallel_worker.py in subprocesses with forced CPU devices (this process may have
initialised JAX with one device already). `--xla_backend_optimization_level=0` there only makes XLA compile
faster; both sides of every comparison are compiled with it.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from dlcore import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "parallel_worker.py")
TIMEOUT = 300


def _env(devices: int) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_"))}
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0",
             PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
  return env


def _start(devices: int, *args) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, WORKER, *map(str, args)], cwd=ROOT, env=_env(devices),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(*procs: subprocess.Popen) -> None:
  """Waits for every worker; on a failure or timeout kills the rest and fails with their output."""
  outputs, failed = [], False
  try:
    for proc in procs:
      out, _ = proc.communicate(timeout=TIMEOUT)
      outputs.append(out[-3000:])
      failed |= proc.returncode != 0
  except subprocess.TimeoutExpired:
    failed = True
    outputs.append(f"timed out after {TIMEOUT} s")
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  if failed:
    pytest.fail("worker failed:\n" + "\n----\n".join(outputs))


def _result(tmp_path, devices: int, mode: str) -> dict:
  _wait(_start(devices, mode, tmp_path))
  with open(tmp_path / f"{mode}.json") as f:
    return json.load(f)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_eight_devices_equal_one_device_with_batchnorm_and_dropout(tmp_path):
  res = _result(tmp_path, 8, "equivalence")
  assert res["train_diff"] < 1e-5  # params and batch_stats after five Adam steps, same global batches
  assert res["metrics_diff"] < 1e-5
  assert res["state_sharding"] == ["P()"]  # everything in the state stays replicated
  assert res["eval_8"] == pytest.approx(res["eval_1"], abs=1e-6)
  assert res["masks_equal_partitionable_True"] and res["masks_equal_partitionable_False"]
  for key in ("err_batch", "err_check"):
    assert "batch_size" in res[key] and "divisible" in res[key] and " 8 " in res[key]
  assert "30" in res["err_batch"] and "12" in res["err_check"]
  assert "num_devices" in res["err_num_devices"] and "9" in res["err_num_devices"]
  assert "bn_stats" in res["err_bn_stats"] and "'local'" in res["err_bn_stats"]
  assert "bn_axis_name" in res["err_axis_name"]


def test_local_batchnorm_uses_per_device_statistics(tmp_path):
  res = _result(tmp_path, 2, "local_bn")
  assert res["local_vs_manual"] < 1e-5  # == mean of single-device steps on each half (params and batch_stats)
  assert res["local_layer0_vs_numpy"] < 1e-5 and res["global_layer0_vs_numpy"] < 1e-5
  assert res["local_vs_global"] > 1e-3
  assert res["local_metrics"]["loss"] == pytest.approx(res["manual_loss"], abs=1e-5)
  assert res["local_rng_kept"]


def test_onednn_convolutions_on_eight_devices(tmp_path):
  res = _result(tmp_path, 8, "onednn")
  if not res["available"]:  # tests/test_ops_conv.py fails where the extension is expected
    pytest.skip("the oneDNN extension is not built")
  assert res["single_onednn"] and res["local_onednn"] and not res["global_onednn"]
  assert res["global_vs_single"] < 1e-5  # same global batch, oneDNN on one device vs XLA on eight
  assert res["local_vs_local_xla"] < 1e-5


def test_resident_data_equals_host_batches_on_four_devices(tmp_path):
  res = _result(tmp_path, 4, "resident")
  for bn_stats in parallel.BN_STATS:
    for per_call in (1, 4):
      assert res[f"{bn_stats}_{per_call}_diff"] == 0.0  # bit for bit
      assert res[f"{bn_stats}_{per_call}_sums_diff"] < 1e-5
      assert res[f"{bn_stats}_{per_call}_sharding"] == ["P()"]


def test_population_split_over_pop_and_data_devices_equals_one_device(tmp_path):
  res = _result(tmp_path, 4, "population")
  for name in ("pop4", "pop2_data2"):
    assert res[f"{name}_diff"] < 1e-5, name  # params and batch_stats of every member
    assert res[f"{name}_sharding"].startswith("P('pop'") and res[f"{name}_metrics_shape"] == [4]
  assert res["member2_vs_single"] < 1e-5
  assert "population size 3 must be divisible by the 2 devices of the 'pop' mesh axis" in res["err_divisible"]


def test_two_processes_equal_one_process_with_eight_devices(tmp_path):
  port = _free_port()
  _wait(_start(8, "reference", tmp_path),
        *[_start(4, "multi", tmp_path, port, 2, i) for i in range(2)])
  ref = np.load(tmp_path / "reference.npz")
  for i in range(2):
    got = np.load(tmp_path / f"multi_{i}.npz")
    assert int(got["local_batch_size"]) == int(ref["local_batch_size"]) // 2
    keys = [k for k in ref.files if k != "local_batch_size"]
    assert {k.split("/")[0] for k in keys} == {"params", "batch_stats", "resident", "metric", "eval", "gathered"}
    diff = max(float(np.max(np.abs(ref[k].astype(np.float64) - got[k]))) for k in keys)
    assert diff < 1e-5, (i, diff)
    for k in (k for k in keys if k.startswith(("params/", "batch_stats/"))):  # device-resident data, 2 per call
      np.testing.assert_array_equal(got[f"resident/{k}"], got[k])
    assert "different states" in str(got["err_replicate"])


def test_make_mesh_in_this_process():
  mesh = parallel.make_mesh()
  assert mesh.axis_names == ("data",) and mesh.size == jax.device_count()
  assert parallel.make_mesh(1).size == 1
  for bad in (0, jax.device_count() + 1):
    with pytest.raises(ValueError, match="num_devices"):
      parallel.make_mesh(bad)


def test_shard_batch_validates_shapes():
  mesh = parallel.make_mesh(1)
  out = parallel.shard_batch({"image": np.ones((4, 3), np.float32), "label": np.arange(4)}, mesh)
  assert out["image"].shape == (4, 3) and out["image"].sharding == parallel.batch_sharding(mesh)
  with pytest.raises(ValueError, match="leading"):
    parallel.shard_batch({"image": np.ones((4, 3)), "label": np.arange(5)}, mesh)
  with pytest.raises(ValueError, match="batch_size"):
    parallel.check_batch_size(0, mesh)


@pytest.fixture
def fake_initialize(monkeypatch):
  calls = []
  for key in list(os.environ):
    if key.startswith(("SLURM_", "OMPI_")):
      monkeypatch.delenv(key)
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kw: calls.append((args, kw)))
  return calls


def test_initialize_distributed_is_a_noop_for_one_plain_process(fake_initialize):
  parallel.initialize_distributed()
  parallel.initialize_distributed(num_processes=1)
  assert fake_initialize == []


def test_initialize_distributed_auto_detects_slurm_and_passes_explicit_args(fake_initialize, monkeypatch):
  slurm = dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="node[01-02]", SLURM_NTASKS="2", SLURM_PROCID="1",
               SLURM_LOCALID="0")
  for key, value in slurm.items():
    monkeypatch.setenv(key, value)
  parallel.initialize_distributed()
  parallel.initialize_distributed("10.0.0.1:1234", 2, 1, initialization_timeout=5)
  assert fake_initialize == [((None, None, None), {}), (("10.0.0.1:1234", 2, 1), {"initialization_timeout": 5})]
  with pytest.raises(ValueError, match="process_id"):
    parallel.initialize_distributed("10.0.0.1:1234", 2, 2)


_STUB_TRAINER = """
import os, sys, time
args = sys.argv[1:]
pid = int(next(a for a in args if a.startswith("--process_id=")).split("=")[1])
with open(os.path.join(os.path.dirname(__file__), f"args_{pid}.txt"), "w") as f:
  f.write(" ".join(args) + "\\n" + os.environ["XLA_FLAGS"] + " " + os.environ["JAX_PLATFORMS"])
if "--fail" in args:
  if pid == 1:
    sys.exit(3)
  time.sleep(60)
"""


@pytest.mark.parametrize("fail", [False, True])
def test_multiprocess_local_script_passes_flags_and_propagates_failure(tmp_path, fail):
  (tmp_path / "stub_trainer.py").write_text(_STUB_TRAINER)
  env = dict(os.environ, PYTHON=sys.executable, TRAINER="stub_trainer", PORT="12345", PYTHONPATH=str(tmp_path))
  cmd = [os.path.join(ROOT, "launch", "multiprocess_local.sh"), "2", "3", "--workdir=/tmp/x y"] + (["--fail"] * fail)
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
  assert proc.returncode == (3 if fail else 0), proc.stderr
  if fail:
    assert "process 1 exited with status 3" in proc.stderr
    return
  for i in range(2):
    args, flags = (tmp_path / f"args_{i}.txt").read_text().splitlines()
    assert args == f"--coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id={i} --workdir=/tmp/x y"
    assert flags.startswith("--xla_force_host_platform_device_count=3") and flags.endswith(" cpu")


def test_cpu_compiler_options_compile_a_conv_step_and_match_the_default_build():
  # Guards the experimental XLA option name (a rename on a jaxlib upgrade is a compile error) and its numerics.
  import jax
  import numpy as np
  from dlcore import models, optim, parallel, state as state_lib, train
  mesh = parallel.make_mesh(1)
  assert parallel.compiler_options(mesh) == parallel.CPU_COMPILER_OPTIONS
  rng = np.random.default_rng(0)
  batch = {"image": rng.random((8, 32, 32, 3), np.float32), "label": rng.integers(0, 10, 8).astype(np.int32)}
  model = models.get("cifar_convnet")
  make = lambda: parallel.replicate(state_lib.create(model, optim.optimizer("sgd", 0.01), batch["image"], 0), mesh)
  tuned = parallel.compile_train_step(train.make_train_step(), mesh)
  default = jax.jit(train.make_train_step())
  (a, ma), (b, mb) = tuned(make(), parallel.shard_batch(batch, mesh)), default(make(), batch)
  np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
