r"""What a training step costs: the data path (host batches vs device-resident, K steps per call) and each feature.

Section 'paths': `dlcore.loop.fit` -- the trainer's loop -- runs a window of steps on synthetic data of the real
datasets' size, once per data path:
  host          TrainBatches.batch_at + parallel.shard_batch + the compiled step, one dispatch per step
  resident K    dlcore.data.DeviceBatches: the training set on the device, batches gathered on device, K steps
                per dispatch (K = --steps_per_call)
for the 784-512-512 MLP (batch 128), the BatchNorm study's 3x100 sigmoid MLP (batch 60, without and with
BatchNorm) and the CIFAR ConvNet (batch 128). Paths alternate window by window (A B C D, D C B A, ...) after a
warm-up fit that compiles everything; each window starts from a fresh copy of the same initial state. Reported:
steps/s (median over windows, [min-max]), the ratio to host (median over back-to-back pairs), the host time per
step spent making batches (host: batch_at + shard_batch; resident: indices + their transfer), and the model's
arithmetic time: XLA's FLOPs per step over the measured float32 matmul peak (n=2048).

Section 'features': the compiled train step (as the trainer compiles it) on one resident batch, with one optional
feature switched on at a time -- dropout (keep 0.5), BatchNorm before / after the nonlinearity, on-device
augmentation (flip,crop), bfloat16 compute, the trainer's per-layer diagnostics -- against the plain step,
alternating, for the MLP and the ConvNet.

  python benchmarks/steps.py                    # both sections, ~10 min on 2 CPU cores; writes benchmarks/results/
  python benchmarks/steps.py --quick            # ~2 min
  python benchmarks/steps.py --device=gpu       # on a GPU (benchmarks/gpu.sh)
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
import optax  # noqa: E402

from benchmarks import machine_info  # noqa: E402
from dlcore import diagnostics, loop, models, optim, parallel, train  # noqa: E402
from dlcore import state as state_lib  # noqa: E402
from dlcore.data import augment as augment_lib  # noqa: E402
from dlcore.data import pipeline, resident  # noqa: E402

# name -> (model options, batch size, example shape, training-set size, optimizer, learning rate)
CASES = {
    "mlp": (dict(name="mlp", hidden=(512, 512)), 128, (28, 28, 1), 60_000, "momentum", 0.01),
    "bn_study": (dict(name="mlp", hidden=(100, 100, 100), activation="sigmoid", initializer="normal",
                      init_scale=0.01), 60, (28, 28, 1), 60_000, "sgd", 0.5),
    "bn_study_bn": (dict(name="mlp", hidden=(100, 100, 100), activation="sigmoid", initializer="normal",
                         init_scale=0.01, batchnorm="before"), 60, (28, 28, 1), 60_000, "sgd", 0.5),
    "cifar_convnet": (dict(name="cifar_convnet"), 128, (32, 32, 3), 50_000, "momentum", 0.01),
}
FEATURES = ("plain", "dropout", "bn_before", "bn_after", "augment", "bfloat16", "diagnostics")

FLAGS = flags.FLAGS
flags.DEFINE_list("sections", ["paths", "breakdown", "features"], "Sections to run: paths, breakdown, features.")
flags.DEFINE_list("breakdown_cases", ["bn_study"], "MLP cases of the breakdown section.")
flags.DEFINE_list("cases", list(CASES), f"Models of the paths section, from {list(CASES)}.")
flags.DEFINE_list("feature_models", ["mlp", "cifar_convnet"], "Models of the features section.")
flags.DEFINE_list("steps_per_call", ["1", "8", "32"], "K values of the resident path.")
flags.DEFINE_integer("windows", 5, "Timed windows per path (paths) or variant (features).")
flags.DEFINE_float("window_s", 2.0, "Target seconds per window (at least --min_steps steps).")
flags.DEFINE_integer("min_steps", 64, "Fewest steps in a window (so K=32 runs at least two calls).")
flags.DEFINE_enum("device", "cpu", ["cpu", "gpu"], "Where to run.")
flags.DEFINE_bool("quick", False, "3 windows of 0.5 s, ConvNet windows of --min_steps steps.")
flags.DEFINE_string("out_dir", os.path.join(_REPO, "benchmarks", "results"), "Where JSON and markdown go ('': "
                    "nowhere).")
flags.DEFINE_string("tag", None, "Results file stem (default steps_<device>[_quick]).")
flags.DEFINE_integer("seed", 0, "Seed for data and initial weights.")


def synthetic(n: int, shape, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {"image": rng.random((n, *shape), dtype=np.float32), "label": rng.integers(0, 10, n).astype(np.int32)}


def median_range(values: list[float]) -> dict:
  return {"median": statistics.median(values), "min": min(values), "max": max(values),
          "values": [round(v, 3) for v in values]}


def pair_ratios(a: list[float], b: list[float]) -> dict:
  """a/b over windows that ran back to back: median and range."""
  return median_range([x / y for x, y in zip(a, b)])


def matmul_peak_gflops(device) -> float:
  """Best-of-5 float32 GFLOP/s of an n x n matmul (n = 2048 on CPU, 8192 on GPU)."""
  n = 8192 if device.platform == "gpu" else 2048
  a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
  mm = jax.jit(lambda x: x @ x)
  mm(a).block_until_ready()
  best = min(_timed(lambda: mm(a).block_until_ready()) for _ in range(5))
  return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def _state(case: str, image, **model_overrides):
  options, _, _, _, opt, lr = CASES[case]
  options = {**options, **model_overrides}
  model = models.get(options.pop("name"), **options)
  tx = optim.optimizer(opt, lr, momentum=0.9) if opt == "momentum" else optim.optimizer(opt, lr)
  return state_lib.create(model, tx, image, FLAGS.seed)


# ---------------------------------------------------------------------------------------------------------------
# Section 'paths'.

def bench_paths(case: str, mesh, windows: int, window_s: float) -> dict:
  _, batch_size, shape, n, _, _ = CASES[case]
  batches = pipeline.TrainBatches(synthetic(n, shape, FLAGS.seed), batch_size, seed=FLAGS.seed)
  initial = parallel.replicate(_state(case, batches.batch_at(0)["image"]), mesh)
  step = parallel.compile_train_step(train.make_train_step(), mesh, initial)
  put = lambda b: parallel.shard_batch(b, mesh)
  ks = [int(k) for k in FLAGS.steps_per_call]
  auto = resident.DeviceBatches(batches, mesh)
  auto.compile(step, initial)
  looped_ms = None
  if auto.steps_per_call == 1 and max(ks) > 1:  # conv steps on CPU: the loop is far slower (one timed call)
    two = resident.DeviceBatches(batches, mesh, steps_per_call=2)
    two.compile(step, initial)
    looped_ms = 1e3 * _timed(lambda: jax.block_until_ready(two.run(step, jax.tree.map(jnp.copy, initial), None,
                                                                      0, 2))) / 2
    ks = [1]
  sources = {"host": batches} | {f"resident K={k}": resident.DeviceBatches(batches, mesh, steps_per_call=k)
                                   for k in ks}

  def fit(source, steps):
    state = jax.tree.map(jnp.copy, initial)  # fit donates its state: every window starts from the same one
    jax.block_until_ready(state)
    config = loop.LoopConfig(steps, log_every=steps, eval_every=0, checkpoint_every=0)
    t = time.perf_counter()
    result = loop.fit(state, step, None, source, None, config, put_batch=put, log=lambda m: None)
    jax.block_until_ready(result.state.params)
    return time.perf_counter() - t

  per_step = {name: fit(src, max(ks)) / max(ks) for name, src in sources.items()}  # compiles; a first estimate
  per_step = {name: fit(src, 2 * max(ks)) / (2 * max(ks)) for name, src in sources.items()}
  steps = max(FLAGS.min_steps, round(window_s / per_step["host"]))
  seconds = machine_info.alternate({name: (lambda src=src: fit(src, steps)) for name, src in sources.items()}, windows)
  rates = {name: [steps / s for s in secs] for name, secs in seconds.items()}

  host_ms = 1e3 * statistics.median(
      [_timed(lambda k=k: put(batches.batch_at(k))) for k in range(200)])
  device_batches = sources[f"resident K={max(ks)}"]
  resident_ms = 1e3 * statistics.median(
      [_timed(lambda k=k: device_batches.placed_indices(k * max(ks), max(ks))) for k in range(50)]) / max(ks)

  flops = step.lower(initial, put(batches.batch_at(0))).compile().cost_analysis()
  flops = flops[0] if isinstance(flops, (list, tuple)) else flops
  out = {"batch_size": batch_size, "example_shape": list(shape), "train_examples": n, "steps_per_window": steps,
         "flops_per_step": float(flops.get("flops", 0.0)) if flops else None,
         "host_batch_ms_per_step": host_ms, "resident_batch_ms_per_step": resident_ms,
         "default_steps_per_call": auto.steps_per_call, "default_why": auto.why,
         "looped_ms_per_step": looped_ms, "paths": {}}
  for name in sources:
    out["paths"][name] = {"steps_per_s": median_range(rates[name]),
                          "vs_host": pair_ratios(rates[name], rates["host"]) if name != "host" else None}
  print(f"[paths {case}] " + "; ".join(f"{n} {v['steps_per_s']['median']:.1f} steps/s" for n, v in
                                       out["paths"].items()), flush=True)
  return out


# ---------------------------------------------------------------------------------------------------------------
# Section 'breakdown': where a small model's step time goes.

def _looped(body, carry, arrays, indices):
  """A timer of one dispatch of a program running `body(carry, batch) -> carry` over the batches of `indices`."""
  def program(carry, arrays, indices):
    return jax.lax.fori_loop(0, indices.shape[0], lambda i, c: body(
        c, {k: jnp.take(v, indices[i], axis=0) for k, v in arrays.items()}), carry)
  compiled = jax.jit(program, compiler_options=parallel.CPU_COMPILER_OPTIONS if jax.devices()[0].platform == "cpu"
                     else None).lower(carry, arrays, indices).compile()
  return lambda: _timed(lambda: jax.block_until_ready(compiled(carry, arrays, indices)))


def bench_breakdown(case: str, windows: int) -> dict:
  """ms per step of nested parts of the step, each K steps in one compiled loop on resident data: the matmuls
  alone at the step's shapes, the forward pass, forward + backward, the whole step; and the FLOPs of each."""
  _, batch_size, shape, n, _, _ = CASES[case]
  k = max(int(v) for v in FLAGS.steps_per_call)
  batches = pipeline.TrainBatches(synthetic(n, shape, FLAGS.seed), batch_size, seed=FLAGS.seed)
  arrays = jax.device_put(batches.arrays())
  indices = jax.device_put(np.stack([batches.indices_at(i) for i in range(k)]).astype(np.int32))
  state = _state(case, batches.batch_at(0)["image"])
  variables = lambda p: {"params": p, "batch_stats": state.batch_stats}
  step_fn = train.make_train_step()

  def loss(params, batch):
    logits = state.apply_fn(variables(params), batch["image"], train=True, rngs={"dropout": state.rng},
                            mutable=["batch_stats"])[0]
    return optax_ce(logits, batch["label"])

  # the dots of an MLP step: forward x@W per layer, backward dW = x^T g per layer and dX = g W^T above the first
  widths = [int(np.prod(shape)), *CASES[case][0]["hidden"], 10]
  dots = [(batch_size, a, b) for a, b in zip(widths, widths[1:])]
  dots += [(a, batch_size, b) for a, b in zip(widths, widths[1:])]
  dots += [(batch_size, b, a) for a, b in zip(widths[1:], widths[2:])]
  mats = [(jnp.ones((m, kk), jnp.float32) * 0.01, jnp.ones((kk, nn), jnp.float32) * 0.01) for m, kk, nn in dots]

  def dots_body(c, batch):  # each dot's left operand depends on the carry, so nothing is hoisted out of the loop
    del batch
    total = c
    for a, b in mats:
      total = total + jnp.sum((a + c * 1e-30) @ b) * 1e-30
    return total

  parts = {
      "matmuls only": _looped(dots_body, jnp.float32(0), arrays, indices),
      "forward": _looped(lambda c, b: c + loss(state.params, b), jnp.float32(0), arrays, indices),
      "forward + backward": _looped(lambda c, b: c + optax_tree_norm(jax.grad(loss)(state.params, b)),
                                    jnp.float32(0), arrays, indices),
      "whole step": _looped(lambda st, b: step_fn(st, b)[0], state, arrays, indices),
  }
  for run in parts.values():
    run()
  seconds = machine_info.alternate(parts, windows)
  out = {"steps_per_call": k, "batch_size": batch_size, "matmul_flops_per_step": float(sum(2 * m * kk * nn
                                                                                          for m, kk, nn in dots)),
         "parts": {name: {"ms_per_step": median_range([1e3 * s / k for s in secs])} for name, secs in seconds.items()}}
  print(f"[breakdown {case}] " + "; ".join(f"{n} {v['ms_per_step']['median']:.3f} ms" for n, v in
                                           out["parts"].items()), flush=True)
  return out


def optax_ce(logits, labels):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def optax_tree_norm(tree):
  return optax.tree.norm(tree)


# ---------------------------------------------------------------------------------------------------------------
# Section 'features'.

def bench_features(case: str, mesh, windows: int, window_s: float) -> dict:
  _, batch_size, shape, _, _, _ = CASES[case]
  batch = parallel.shard_batch(synthetic(batch_size, shape, FLAGS.seed), mesh)
  variants = {"plain": ({}, None), "dropout": ({"keep_prob": 0.5}, None), "bn_before": ({"batchnorm": "before"}, None),
              "bn_after": ({"batchnorm": "after"}, None), "augment": ({}, "flip,crop"),
              "bfloat16": ({"dtype": models.compute_dtype("bfloat16")}, None), "diagnostics": ({}, None)}
  runners, states = {}, {}
  for name, (overrides, augment) in variants.items():
    state = parallel.replicate(_state(case, np.asarray(batch["image"]), **overrides), mesh)
    layer_acts = None
    if name == "diagnostics":  # the trainer's loop.diagnostics: per-layer norms, ratios, dead units
      options = dict(CASES[case][0])
      layer_acts = diagnostics.layer_activations(models.get(options.pop("name"), **options), state.variables(),
                                                 batch["image"])
    step = parallel.compile_train_step(
        train.make_train_step(augment=augment_lib.make(augment) if augment else None, diagnostics=layer_acts),
        mesh, state)
    states[name] = step(state, batch)[0]
    jax.block_until_ready(states[name])

    def run(steps, name=name, step=step):
      st = states[name]
      t = time.perf_counter()
      for _ in range(steps):
        st, _ = step(st, batch)
      jax.block_until_ready(st)
      states[name] = st
      return time.perf_counter() - t

    runners[name] = run
  per_step = _timed(lambda: runners["plain"](10)) / 10
  steps = max(5, round(window_s / per_step))
  seconds = machine_info.alternate({n: (lambda r=r: r(steps)) for n, r in runners.items()}, windows)
  out = {"batch_size": batch_size, "steps_per_window": steps, "variants": {}}
  for name in variants:
    ms = [1e3 * s / steps for s in seconds[name]]
    out["variants"][name] = {"ms_per_step": median_range(ms),
                             "vs_plain": pair_ratios(seconds[name], seconds["plain"]) if name != "plain" else None}
  print(f"[features {case}] " + "; ".join(f"{n} {v['ms_per_step']['median']:.2f} ms" for n, v in
                                          out["variants"].items()), flush=True)
  return out


# ---------------------------------------------------------------------------------------------------------------
# Report.

def _r(r: dict | None) -> str:
  return "1" if r is None else f"**{r['median']:.2f}** [{r['min']:.2f}-{r['max']:.2f}]"


def markdown(result: dict) -> str:
  m = result["machine"]
  lines = [f"# Step costs: data paths and features ({result['config']['device']})", "",
           f"Machine: {m['cpu_model']} ({' '.join(m['cpu_isa'])}), {m['usable_cpus']} usable CPUs, "
           f"{m['memory_gib']:.0f} GiB RAM; python {m['python']}, jax {m['jax']}, jaxlib {m.get('jaxlib')}, "
           f"flax {m.get('flax')}. XLA_FLAGS={m['xla_flags']!r}.", "",
           f"Command: `{result['command']}` ({result['runtime_s']:.0f} s). Load average before / after: "
           f"{result['loadavg_before']} / {result['loadavg_after']}.", ""]
  if "paths" in result:
    peak = result["matmul_peak_gflops"]
    lines += ["## Data paths: host batches vs device-resident, K steps per call", "",
              f"`loop.fit` over synthetic data of the real sets' size; {result['config']['windows']} alternating "
              "windows per path, each from the same initial state. steps/s: median [min-max] over windows; vs "
              "host: median [min-max] over back-to-back pairs. Arithmetic: XLA's FLOPs per step over the "
              f"float32 matmul peak measured in the same run ({peak:.1f} GFLOP/s, n=2048).", ""]
    names = max((list(r["paths"]) for r in result["paths"].values()), key=len)
    lines += ["| model | batch | " + " | ".join(f"{n} steps/s" for n in names) + " | " +
              " | ".join(f"{n} vs host" for n in names[1:]) + " | arithmetic ms/step | best ms/step | "
              "host batch ms/step: host / resident |",
              "|---" * (2 * len(names) + 4) + "|"]
    for case, r in result["paths"].items():
      rates = {n: r["paths"][n]["steps_per_s"]["median"] for n in names if n in r["paths"]}
      arith = (1e3 * r["flops_per_step"] / (peak * 1e9)) if r["flops_per_step"] else None
      lines.append(f"| {case} | {r['batch_size']} | " + " | ".join(
          f"{rates[n]:.1f}" if n in rates else "-" for n in names) + " | " +
          " | ".join(_r(r["paths"][n]["vs_host"]) if n in rates else "-" for n in names[1:]) +
          f" | {arith:.3f} | {1e3 / max(rates.values()):.3f} | {r['host_batch_ms_per_step']:.3f} / "
          f"{r['resident_batch_ms_per_step']:.4f} |")
    lines.append("")
    lines += [f"Default steps per call (`DeviceBatches` without `steps_per_call`): " + "; ".join(
        f"{case} {r['default_steps_per_call']} ({r['default_why']})" for case, r in result["paths"].items()) + "."]
    for case, r in result["paths"].items():
      if r.get("looped_ms_per_step"):
        lines.append(f"{case}: inside a loop (K=2, one call) a step takes {r['looped_ms_per_step']:.0f} ms, "
                     f"against {1e3 / r['paths']['resident K=1']['steps_per_s']['median']:.0f} ms with one step per "
                     "call: XLA:CPU runs the convolution gradients in a loop body uncanonicalised, so K>1 is not "
                     "measured for it.")
    lines.append("")
  if "breakdown" in result:
    peak = result["matmul_peak_gflops"]
    lines += ["## Where a small model's step time goes", "",
              "Nested parts of the step, each run K times in one compiled loop over resident batches (no "
              "dispatch, no host work), ms per step, median [min-max] over alternating windows: the step's "
              "matmuls alone at its shapes (forward, weight and input gradients), the forward pass (loss), forward "
              "+ backward (gradients), the whole step (+ SGD update and metrics). Arithmetic: the matmul FLOPs "
              f"at the measured n=2048 peak ({peak:.1f} GFLOP/s).", "",
              "| model | batch | " + " | ".join(next(iter(result["breakdown"].values()))["parts"]) +
              " | matmul FLOPs/step | arithmetic ms/step | matmul GFLOP/s at the step's shapes |",
              "|---" * (3 + len(next(iter(result["breakdown"].values()))["parts"]) + 2) + "|"]
    for case, r in result["breakdown"].items():
      mm = r["parts"]["matmuls only"]["ms_per_step"]["median"]
      lines.append(f"| {case} | {r['batch_size']} | " + " | ".join(
          f"{v['ms_per_step']['median']:.3f} [{v['ms_per_step']['min']:.3f}-{v['ms_per_step']['max']:.3f}]"
          for v in r["parts"].values()) + f" | {r['matmul_flops_per_step']:.3g} | "
          f"{1e3 * r['matmul_flops_per_step'] / (peak * 1e9):.3f} | {r['matmul_flops_per_step'] / mm / 1e6:.1f} |")
    lines.append("")
  if "features" in result:
    lines += ["## The cost of each feature in the step", "",
              "The compiled train step (the trainer's compile options) on one resident batch, one feature on "
              "at a time; ms/step median [min-max] over alternating windows; vs plain: time ratio over "
              "back-to-back pairs (above 1: slower). diagnostics: the trainer's `loop.diagnostics` (per-layer norms, "
              "update/weight ratios, dead units), computed in every step.", ""]
    names = list(FEATURES)
    lines += ["| model | " + " | ".join(f"{n} ms" for n in names) + " | " +
              " | ".join(f"{n} vs plain" for n in names[1:]) + " |", "|---" * (2 * len(names)) + "|"]
    for case, r in result["features"].items():
      lines.append(f"| {case} (batch {r['batch_size']}) | " +
                   " | ".join(f"{r['variants'][n]['ms_per_step']['median']:.2f}" for n in names) + " | " +
                   " | ".join(_r(r["variants"][n]["vs_plain"]) for n in names[1:]) + " |")
    lines.append("")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for flag, allowed in (("sections", ("paths", "breakdown", "features")), ("cases", tuple(CASES)),
                        ("breakdown_cases", ("mlp", "bn_study")),
                        ("feature_models", ("mlp", "cifar_convnet"))):
    unknown = sorted(set(getattr(FLAGS, flag)) - set(allowed))
    if unknown:
      raise app.UsageError(f"--{flag}: unknown {unknown}; choose from {list(allowed)}")
  if any(not k.isdigit() or int(k) < 1 for k in FLAGS.steps_per_call):
    raise app.UsageError(f"--steps_per_call: positive integers, got {FLAGS.steps_per_call}")
  if FLAGS.device == "cpu":
    jax.config.update("jax_platforms", "cpu")
  try:
    device = jax.devices(FLAGS.device)[0]
  except RuntimeError as e:
    raise app.UsageError(f"--device={FLAGS.device}: jax sees no such device ({e})") from e
  mesh = parallel.make_mesh(1)
  windows, window_s = (min(FLAGS.windows, 3), min(FLAGS.window_s, 0.5)) if FLAGS.quick else (FLAGS.windows,
                                                                                            FLAGS.window_s)
  start = time.perf_counter()
  result = {"command": " ".join(["python", "benchmarks/steps.py", *sys.argv[1:]]),
            "config": {"device": FLAGS.device, "windows": windows, "window_s": window_s,
                       "steps_per_call": FLAGS.steps_per_call, "quick": FLAGS.quick},
            "loadavg_before": machine_info.loadavg(), "machine": machine_info.describe()}
  if "paths" in FLAGS.sections:
    result["matmul_peak_gflops"] = matmul_peak_gflops(device)
    result["paths"] = {case: bench_paths(case, mesh, windows, window_s) for case in FLAGS.cases}
  if "breakdown" in FLAGS.sections:
    result.setdefault("matmul_peak_gflops", matmul_peak_gflops(device))
    result["breakdown"] = {case: bench_breakdown(case, windows) for case in FLAGS.breakdown_cases}
  if "features" in FLAGS.sections:
    result["features"] = {case: bench_features(case, mesh, windows, window_s) for case in FLAGS.feature_models}
  result["runtime_s"] = time.perf_counter() - start
  result["loadavg_after"] = machine_info.loadavg()
  table = markdown(result)
  print(table)
  tag = FLAGS.tag or f"steps_{FLAGS.device}" + ("_quick" if FLAGS.quick else "")
  machine_info.write_results(FLAGS.out_dir, tag, result, table)


if __name__ == "__main__":
  app.run(main)
