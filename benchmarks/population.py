r"""Populations against sequential runs: member-steps per second of K models trained by one vmapped step.

For each model (the BatchNorm study's 3x100 sigmoid MLP at batch 60, the 784-512-512 MLP at batch 128) and each
K (--sizes), this times, alternately, in one process:
  population   `dlcore.population`: K members (their own learning rates and seeds) in one program, on
               device-resident data (`DeviceBatches`, --steps_per_call steps per dispatch), one shared batch order
  sequential   K single runs one after another, each on the same resident path (the fastest single-run path,
               benchmarks/results/steps_cpu.md); they share one compiled step (same hyperparameters, other seeds),
               so no run pays a compile inside the timing
  sequential_host  the same single runs on host batches, one dispatch per step (the path before resident data)
both for --steps steps per member. Reported: member-steps/s (median [min-max] over --windows), the ratio
population / sequential (median over back-to-back pairs), and the time of one population step against one single
step (K members' worth of work in one step costs K x the single step's time at ratio 1).

  python benchmarks/population.py                 # ~8 min on 2 CPU cores; writes benchmarks/results/
  python benchmarks/population.py --device=gpu    # the GPU command (benchmarks/gpu.sh runs it)
"""

import os
import statistics
import sys
import time

from absl import app, flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import machine_info  # noqa: E402
from dlcore import models, optim, parallel, population, train  # noqa: E402
from dlcore import state as state_lib  # noqa: E402
from dlcore.data import pipeline, resident  # noqa: E402

# name -> (model options, batch size, training-set size, optimizer, steps per member in a window)
CASES = {
    "bn_study": (dict(name="mlp", hidden=(100, 100, 100), activation="sigmoid", initializer="normal",
                      init_scale=0.01), 60, 60_000, "sgd", 256),
    "mlp": (dict(name="mlp", hidden=(512, 512)), 128, 60_000, "momentum", 64),
}

FLAGS = flags.FLAGS
flags.DEFINE_list("cases", list(CASES), f"Models, from {list(CASES)}.")
flags.DEFINE_list("sizes", ["4", "16", "64"], "Population sizes K.")
flags.DEFINE_integer("steps", None, "Steps per member in a window (default: 256 for bn_study, 64 for mlp).")
flags.DEFINE_integer("windows", 3, "Timed windows per mode.")
flags.DEFINE_integer("steps_per_call", 32, "Steps per dispatch on the resident path, both modes.")
flags.DEFINE_enum("device", "cpu", ["cpu", "gpu"], "Where to run.")
flags.DEFINE_string("out_dir", os.path.join(_REPO, "benchmarks", "results"), "Where JSON and markdown go ('': "
                    "nowhere).")
flags.DEFINE_string("tag", None, "Results file stem (default population_<device>).")


def _rates(values: list[float]) -> dict:
  return {"median": statistics.median(values), "min": min(values), "max": max(values),
          "values": [round(v, 1) for v in values]}


def bench(case: str, k: int, mesh) -> dict:
  options, batch_size, n, opt, steps = CASES[case]
  steps = FLAGS.steps or steps
  options = dict(options)
  model = models.get(options.pop("name"), **options)
  rng = np.random.default_rng(0)
  data = {"image": rng.random((n, 28, 28, 1), dtype=np.float32), "label": rng.integers(0, 10, n).astype(np.int32)}
  batches = pipeline.TrainBatches(data, batch_size, seed=0)
  sources = {mode: resident.DeviceBatches(batches, mesh, steps_per_call=FLAGS.steps_per_call)
             for mode in ("population", "sequential")}  # each keeps its own compiled program
  sample = batches.batch_at(0)["image"]
  rates = list(np.geomspace(0.01, 0.5, k))
  pop0 = population.create(model, sample, optimizer=opt, learning_rate=rates, seed=list(range(k)))
  pop_step = population.make_train_step()
  tx = optim.optimizer(opt, rates[0])  # one optimiser object: the single runs share one compiled program
  single0 = [state_lib.create(model, tx, sample, seed) for seed in range(k)]
  single_step = jax.jit(train.make_train_step())

  def train_for(source, step, state):
    sums, done = None, 0
    while done < steps:
      calls = min(source.steps_per_call, steps - done)
      state, sums = source.run(step, state, sums, done, calls)
      done += calls
    jax.block_until_ready(state)

  host_step = jax.jit(train.make_train_step(), donate_argnums=0)

  def run(mode, members: int = k) -> float:
    """Seconds for `steps` steps of every member: one population, or K single runs one after another (on
    resident data, or on host batches with one dispatch per step as before device-resident data)."""
    states = ([jax.tree.map(jnp.copy, pop0)] if mode == "population" else
              [jax.tree.map(jnp.copy, s) for s in single0[:members]])
    jax.block_until_ready(states)
    t = time.perf_counter()
    for state in states:
      if mode == "sequential_host":
        for i in range(steps):
          state, _ = host_step(state, batches.batch_at(i))
        jax.block_until_ready(state)
      else:
        train_for(sources[mode], pop_step if mode == "population" else single_step, state)
    return time.perf_counter() - t

  modes = ("population", "sequential", "sequential_host")
  for mode in modes:  # compile and warm up
    run(mode, members=1)
  seconds = {mode: [] for mode in modes}
  for w in range(FLAGS.windows):
    for mode in (modes if w % 2 == 0 else modes[::-1]):
      seconds[mode].append(run(mode))
  member_steps = k * steps
  out = {"k": k, "batch_size": batch_size, "steps": steps,
         "population": _rates([member_steps / s for s in seconds["population"]]),
         "sequential": _rates([member_steps / s for s in seconds["sequential"]]),
         "sequential_host": _rates([member_steps / s for s in seconds["sequential_host"]])}
  out["ratio"] = _rates([b / a for a, b in zip(seconds["population"], seconds["sequential"])])
  out["ratio_host"] = _rates([b / a for a, b in zip(seconds["population"], seconds["sequential_host"])])
  out["population_step_ms"] = 1e3 * statistics.median(seconds["population"]) / steps
  out["single_step_ms"] = 1e3 * statistics.median(seconds["sequential"]) / member_steps
  print(f"[{case} K={k}] population {out['population']['median']:.0f} member-steps/s, sequential "
        f"{out['sequential']['median']:.0f}: {out['ratio']['median']:.2f}x [{out['ratio']['min']:.2f}-"
        f"{out['ratio']['max']:.2f}]; sequential on host batches {out['sequential_host']['median']:.0f}: "
        f"{out['ratio_host']['median']:.2f}x", flush=True)
  return out


def markdown(result: dict) -> str:
  m = result["machine"]
  lines = [f"# Populations vs sequential runs ({result['config']['device']})", "",
           f"Machine: {m['cpu_model']} ({' '.join(m['cpu_isa'])}), {m['usable_cpus']} usable CPUs, "
           f"{m['memory_gib']:.0f} GiB RAM; python {m['python']}, jax {m['jax']}, jaxlib {m.get('jaxlib')}.", "",
           f"Command: `{result['command']}` ({result['runtime_s']:.0f} s). Load average before / after: "
           f"{result['loadavg_before']} / {result['loadavg_after']}.", "",
           "256 (bn_study) or 64 (mlp) steps per member per window, both modes on device-resident data at "
           f"{result['config']['steps_per_call']} steps per dispatch; {result['config']['windows']} alternating "
           "windows. member-steps/s: median [min-max]; ratio: population / sequential, median [min-max] over "
           "back-to-back pairs. Step times: one population step (K members) and one single-model step.", "",
           "| model | batch | K | population member-steps/s | sequential member-steps/s | **ratio** | "
           "sequential on host batches | ratio to it | population step ms | single step ms | "
           "population step / single step |", "|---" * 11 + "|"]
  for case, rows in result["cases"].items():
    for r in rows:
      lines.append(f"| {case} | {r['batch_size']} | {r['k']} | {r['population']['median']:.0f} "
                   f"[{r['population']['min']:.0f}-{r['population']['max']:.0f}] | {r['sequential']['median']:.0f} "
                   f"[{r['sequential']['min']:.0f}-{r['sequential']['max']:.0f}] | **{r['ratio']['median']:.2f}** "
                   f"[{r['ratio']['min']:.2f}-{r['ratio']['max']:.2f}] | {r['sequential_host']['median']:.0f} | "
                   f"{r['ratio_host']['median']:.2f} [{r['ratio_host']['min']:.2f}-{r['ratio_host']['max']:.2f}] | "
                   f"{r['population_step_ms']:.3f} | "
                   f"{r['single_step_ms']:.3f} | {r['population_step_ms'] / r['single_step_ms']:.1f} |")
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  unknown = sorted(set(FLAGS.cases) - set(CASES))
  if unknown:
    raise app.UsageError(f"--cases: unknown {unknown}; choose from {list(CASES)}")
  if any(not s.isdigit() or int(s) < 1 for s in FLAGS.sizes):
    raise app.UsageError(f"--sizes: positive integers, got {FLAGS.sizes}")
  if FLAGS.device == "cpu":
    jax.config.update("jax_platforms", "cpu")
  mesh = parallel.make_mesh(1)
  start = time.perf_counter()
  result = {"command": " ".join(["python", "benchmarks/population.py", *sys.argv[1:]]),
            "config": {"device": FLAGS.device, "steps": FLAGS.steps or "per case", "windows": FLAGS.windows,
                       "steps_per_call": FLAGS.steps_per_call, "sizes": [int(s) for s in FLAGS.sizes]},
            "loadavg_before": machine_info.loadavg(), "machine": machine_info.describe(),
            "cases": {case: [bench(case, int(k), mesh) for k in FLAGS.sizes] for case in FLAGS.cases}}
  result["runtime_s"] = time.perf_counter() - start
  result["loadavg_after"] = machine_info.loadavg()
  table = markdown(result)
  print(table)
  machine_info.write_results(FLAGS.out_dir, FLAGS.tag or f"population_{FLAGS.device}", result, table)


if __name__ == "__main__":
  app.run(main)
