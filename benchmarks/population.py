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
  python benchmarks/population.py --sections=matmuls   # matmul forms only: ~1 min
"""

from collections.abc import Callable
import os
import statistics
import sys
import time

from absl import app, flags
from jax import lax

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
SECTIONS = ("training", "matmuls")
flags.DEFINE_list("sections", list(SECTIONS), f"What to measure, from {list(SECTIONS)}.")
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
  seconds = machine_info.alternate({mode: (lambda mode=mode: run(mode)) for mode in modes}, FLAGS.windows)
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


def _repeated(fn, a0, a1, reps: int = 20) -> Callable[[], float]:
  """A timer: seconds per repetition of fn(a0, a1) over `reps` repetitions in one compiled loop (compiled and run
  once here); a0 changes by one element per repetition, so XLA cannot hoist the matmul out of the loop."""
  def loop(a0, a1):
    def body(_, carry):
      a0, acc = carry
      out = fn(a0, a1).reshape(-1)
      first = (0,) * a0.ndim
      return a0.at[first].add(out[0] * 1e-30), acc + out[-1]
    return lax.fori_loop(0, reps, body, (a0, jnp.float32(0)))[1]
  run = jax.jit(loop)
  run(a0, a1).block_until_ready()

  def timer() -> float:
    t = time.perf_counter()
    run(a0, a1).block_until_ready()
    return (time.perf_counter() - t) / reps
  return timer


def matmuls(case: str, k: int) -> dict:
  """Milliseconds for K members' first-layer forward matmul, its weight gradient and one hidden layer's forward
  matmul, in the forms of the module docstring (median of --windows alternating rounds [min-max]), with GFLOP/s."""
  options, n, *_ = CASES[case]
  i, o, h = 28 * 28, options["hidden"][0], options["hidden"][1]
  ones = lambda *shape: jnp.full(shape, 0.5, jnp.float32)  # noqa: E731
  x, xk, w, wide, d, d_wide = ones(n, i), ones(k, n, i), ones(k, i, o), ones(i, k * o), ones(k, n, o), ones(n, k * o)
  hk, wh = ones(k, n, o), ones(k, o, h)
  batched = lambda a, b: jnp.einsum("kni,kio->kno", a, b)  # noqa: E731
  gradient = lambda a, b: jnp.einsum("kni,kno->kio", a, b)  # noqa: E731
  transposed = lambda a, b: a.T @ b  # noqa: E731
  forms = {  # (op, form): (function, arguments, how many calls make K members: K for one member's matmul)
      ("forward", "single"): (jnp.matmul, (x, w[0]), k),
      ("forward", "batched"): (batched, (xk, w), 1),
      ("forward", "shared"): (jax.vmap(jnp.matmul, in_axes=(None, 0)), (x, w), 1),
      ("forward", "wide"): (jnp.matmul, (x, wide), 1),
      ("weight gradient", "single"): (transposed, (x, d[0]), k),
      ("weight gradient", "batched"): (gradient, (xk, d), 1),
      ("weight gradient", "shared"): (jax.vmap(transposed, in_axes=(None, 0)), (x, d), 1),
      ("weight gradient", "wide"): (transposed, (x, d_wide), 1),
      ("hidden forward", "single"): (jnp.matmul, (hk[0], wh[0]), k),
      ("hidden forward", "batched"): (batched, (hk, wh), 1)}
  timers = {key: (lambda timer=_repeated(fn, *args), calls=calls: calls * timer())
            for key, (fn, args, calls) in forms.items()}
  seconds = machine_info.alternate(timers, max(FLAGS.windows, 3))
  flops = {"forward": 2 * n * i * o * k, "weight gradient": 2 * n * i * o * k, "hidden forward": 2 * n * o * h * k}
  dense = list(zip((i, *options["hidden"]), (*options["hidden"], 10)))
  out = {"k": k, "shapes": {"batch": n, "input": i, "first": o, "second": h},
         "first_layer_flop_share": dense[0][0] * dense[0][1] / sum(a * b for a, b in dense)}
  for (op, form), s in seconds.items():
    out.setdefault(op, {})[form] = {"ms": 1e3 * statistics.median(s), "ms_min": 1e3 * min(s), "ms_max": 1e3 * max(s),
                                    "gflops": flops[op] / statistics.median(s) / 1e9}
  print(f"[{case} K={k} matmuls] " + "; ".join(
      f"{op}: " + ", ".join(f"{f} {out[op][f]['ms']:.3f} ms" for f in out[op]) for op in flops), flush=True)
  return out


def matmul_markdown(result: dict) -> list[str]:
  lines = ["", "## Why: K members' matmuls in four forms", "",
           "Each form repeated in one compiled loop, forms alternating over "
           f"{max(result['config']['windows'], 3)} rounds (median); ms for all K members, GFLOP/s in brackets, "
           "and the speed-up over K single matmuls. single: one member's matmul x K (K single runs); batched: "
           "batched on both operands (the population step); shared: vmapped with a shared input (XLA transposes "
           "the member-major weights into one wide matmul); wide: one matmul on member-minor weights (the bound of "
           "a layout change). Hidden layers have per-member inputs: single and batched only.", "",
           "| model | K | first layer's FLOP share | matmul | single | batched | shared | wide |", "|---" * 8 + "|"]
  for case, rows in result["matmuls"].items():
    for r in rows:
      for op in ("forward", "weight gradient", "hidden forward"):
        single = r[op]["single"]["ms"]
        cells = [f"{r[op][f]['ms']:.3f} ({r[op][f]['gflops']:.0f}) **{single / r[op][f]['ms']:.2f}x**"
                 if f in r[op] else "-" for f in ("batched", "shared", "wide")]
        lines.append(f"| {case} | {r['k']} | {r['first_layer_flop_share']:.0%} | {op} | {single:.3f} "
                     f"({r[op]['single']['gflops']:.0f}) | " + " | ".join(cells) + " |")
  return lines


def markdown(result: dict) -> str:
  m = result["machine"]
  lines = [f"# Populations vs sequential runs ({result['config']['device']})", "",
           f"Machine: {m['cpu_model']} ({' '.join(m['cpu_isa'])}), {m['usable_cpus']} usable CPUs, "
           f"{m['memory_gib']:.0f} GiB RAM; python {m['python']}, jax {m['jax']}, jaxlib {m.get('jaxlib')}.", "",
           f"Command: `{result['command']}` ({result['runtime_s']:.0f} s). Load average before / after: "
           f"{result['loadavg_before']} / {result['loadavg_after']}."]
  if "cases" in result:
    lines += _training_markdown(result)
  if "matmuls" in result:
    lines += matmul_markdown(result)
  return "\n".join(lines) + "\n"


def _training_markdown(result: dict) -> list[str]:
  lines = ["", "256 (bn_study) or 64 (mlp) steps per member per window, both modes on device-resident data at "
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
  return lines


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  unknown = sorted(set(FLAGS.cases) - set(CASES))
  if unknown:
    raise app.UsageError(f"--cases: unknown {unknown}; choose from {list(CASES)}")
  bad = sorted(set(FLAGS.sections) - set(SECTIONS))
  if bad:
    raise app.UsageError(f"--sections: unknown {bad}; choose from {list(SECTIONS)}")
  if any(not s.isdigit() or int(s) < 1 for s in FLAGS.sizes):
    raise app.UsageError(f"--sizes: positive integers, got {FLAGS.sizes}")
  if FLAGS.device == "cpu":
    jax.config.update("jax_platforms", "cpu")
  mesh = parallel.make_mesh(1)
  start = time.perf_counter()
  result = {"command": " ".join(["python", "benchmarks/population.py", *sys.argv[1:]]),
            "config": {"device": FLAGS.device, "steps": FLAGS.steps or "per case", "windows": FLAGS.windows,
                       "steps_per_call": FLAGS.steps_per_call, "sections": FLAGS.sections,
                       "sizes": [int(s) for s in FLAGS.sizes]},
            "loadavg_before": machine_info.loadavg(), "machine": machine_info.describe()}
  if "training" in FLAGS.sections:
    result["cases"] = {case: [bench(case, int(k), mesh) for k in FLAGS.sizes] for case in FLAGS.cases}
  if "matmuls" in FLAGS.sections:
    result["matmuls"] = {case: [matmuls(case, int(k)) for k in FLAGS.sizes] for case in FLAGS.cases}
  result["runtime_s"] = time.perf_counter() - start
  result["loadavg_after"] = machine_info.loadavg()
  table = markdown(result)
  print(table)
  machine_info.write_results(FLAGS.out_dir, FLAGS.tag or f"population_{FLAGS.device}", result, table)


if __name__ == "__main__":
  app.run(main)
