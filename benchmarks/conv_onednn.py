r"""oneDNN convolutions (DLCORE_CPU_CONV=onednn, dlcore.ops.conv) against XLA's, on CPU, in one process.

  per convolution   each of ResNet-20's convolution shapes at batch --batch: forward + both gradients (one jitted
                    `jax.vjp` call returning y, dx, dw), and their sum over one ResNet-20 step (each shape times
                    the number of layers that have it)
  whole step        dlcore's train_step (cross-entropy, SGD momentum 0.9) for ResNet-20 and the CIFAR ConvNet

Both sides compile as the trainer does on CPU (`dlcore.parallel.CPU_COMPILER_OPTIONS`). Runners alternate window by
window (A B, B A, ...) so machine noise hits both; each result is the median over --windows windows with the
fastest and slowest window as the spread, and the ratio is the median of back-to-back window pairs.

  python benchmarks/conv_onednn.py                  # writes benchmarks/results/conv_onednn_cpu.{json,md}
"""

import json
import os
import statistics
import time

from absl import app, flags
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from dlcore import models, optim, parallel, state as state_lib, train
from dlcore.ops import conv

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 128, "images per batch")
flags.DEFINE_integer("windows", 7, "timed windows per runner")
flags.DEFINE_float("window_s", 1.0, "seconds per window (at least one call)")
flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"), "output folder")

DN = ("NHWC", "HWIO", "NHWC")
# ResNet-20 (projection shortcuts): (input HWC, kernel, stride, layers with this shape).
RESNET20_CONVS = [((32, 32, 3), (3, 3, 3, 16), 1, 1), ((32, 32, 16), (3, 3, 16, 16), 1, 6),
                  ((32, 32, 16), (3, 3, 16, 32), 2, 1), ((32, 32, 16), (1, 1, 16, 32), 2, 1),
                  ((16, 16, 32), (3, 3, 32, 32), 1, 5), ((16, 16, 32), (3, 3, 32, 64), 2, 1),
                  ((16, 16, 32), (1, 1, 32, 64), 2, 1), ((8, 8, 64), (3, 3, 64, 64), 1, 5)]
BACKENDS = ("xla", "onednn")


def _window(fn) -> float:
  """Seconds per call over one window."""
  calls, start = 0, time.perf_counter()
  while True:
    jax.block_until_ready(fn())
    calls += 1
    if time.perf_counter() - start >= FLAGS.window_s:
      return (time.perf_counter() - start) / calls


def _alternate(runners: dict) -> dict:
  """{name: [seconds per call of each window]}, the runners alternating A B, B A, ..."""
  for fn in runners.values():
    jax.block_until_ready(fn())  # compile and warm up
  times, names = {name: [] for name in runners}, list(runners)
  for w in range(FLAGS.windows):
    for name in (names if w % 2 == 0 else names[::-1]):
      times[name].append(_window(runners[name]))
  return times


def _summary(times: dict) -> dict:
  out = {name: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t), "max_ms": 1e3 * max(t)}
         for name, t in times.items()}
  out["speedup"] = statistics.median(a / b for a, b in zip(times["xla"], times["onednn"]))
  return out


def _conv_runner(backend: str, x, w, stride: int):
  def f(x, w, dy):
    y, vjp = jax.vjp(lambda x, w: conv.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=DN),
                     x, w)
    return (y,) + vjp(dy)

  with conv.use_backend(backend):
    compiled = jax.jit(f, compiler_options=parallel.CPU_COMPILER_OPTIONS).lower(x, w, _dy(x, w, stride)).compile()
  dy = _dy(x, w, stride)
  return lambda: compiled(x, w, dy)


def _dy(x, w, stride):
  shape = jax.eval_shape(lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                                               dimension_numbers=DN), x, w).shape
  return jnp.ones(shape, jnp.float32)


def _step_runner(backend: str, name: str):
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.standard_normal((FLAGS.batch, 32, 32, 3)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, FLAGS.batch), jnp.int32)}
  init = state_lib.create(models.get(name, num_classes=10), optim.optimizer("momentum", 0.01), batch["image"], 0)
  with conv.use_backend(backend):
    compiled = jax.jit(train.make_train_step(), compiler_options=parallel.CPU_COMPILER_OPTIONS).lower(
        init, batch).compile()
  return lambda: compiled(init, batch)


def main(_):
  if not conv.onednn_available():
    raise SystemExit(conv.onednn_status())
  rng = np.random.default_rng(0)
  result = {"batch": FLAGS.batch, "windows": FLAGS.windows, "onednn": conv.onednn_status(), "convs": [],
            "cpus": os.cpu_count(), "load_before": os.getloadavg()}
  total = {b: np.zeros(FLAGS.windows) for b in BACKENDS}
  for hwc, kernel, stride, count in RESNET20_CONVS:
    x = jnp.asarray(rng.standard_normal((FLAGS.batch,) + hwc), jnp.float32)
    w = jnp.asarray(rng.standard_normal(kernel), jnp.float32)
    times = _alternate({b: _conv_runner(b, x, w, stride) for b in BACKENDS})
    for b in BACKENDS:
      total[b] += count * np.array(times[b])
    result["convs"].append({"input": hwc, "kernel": kernel, "stride": stride, "count": count, **_summary(times)})
    print(result["convs"][-1], flush=True)
  result["resnet20_convs_per_step"] = _summary({b: list(t) for b, t in total.items()})
  for name in ("resnet20", "cifar_convnet"):
    result[f"{name}_step"] = _summary(_alternate({b: _step_runner(b, name) for b in BACKENDS}))
    print(name, result[f"{name}_step"], flush=True)
  result["load_after"] = os.getloadavg()
  os.makedirs(FLAGS.out, exist_ok=True)
  with open(os.path.join(FLAGS.out, "conv_onednn_cpu.json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(FLAGS.out, "conv_onednn_cpu.md"), "w") as f:
    f.write(_markdown(result))


def _markdown(r: dict) -> str:
  ms = lambda s: f"{s['median_ms']:.2f} ({s['min_ms']:.2f}-{s['max_ms']:.2f})"
  lines = [f"# oneDNN vs XLA convolutions, CPU ({r['cpus']} cores), batch {r['batch']}, {r['onednn']}", "",
           f"Median ms per call over {r['windows']} alternating windows (fastest-slowest window); speedup = "
           "median of XLA/oneDNN over back-to-back windows. Load average before/after: "
           f"{r['load_before'][0]:.1f} / {r['load_after'][0]:.1f}.", "",
           "| ResNet-20 convolution (fwd + both grads) | layers | XLA ms | oneDNN ms | speedup |", "|---|---|---|---|---|"]
  for c in r["convs"]:
    lines.append(f"| {c['input']} * {c['kernel']} / {c['stride']} | {c['count']} | {ms(c['xla'])} | "
                 f"{ms(c['onednn'])} | {c['speedup']:.2f} |")
  s = r["resnet20_convs_per_step"]
  lines.append(f"| sum over a ResNet-20 step | 21 | {ms(s['xla'])} | {ms(s['onednn'])} | {s['speedup']:.2f} |")
  lines += ["", "| whole train step | XLA ms | oneDNN ms | speedup |", "|---|---|---|---|"]
  for name in ("resnet20", "cifar_convnet"):
    s = r[f"{name}_step"]
    lines.append(f"| {name} | {ms(s['xla'])} | {ms(s['onednn'])} | {s['speedup']:.2f} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  app.run(main)
