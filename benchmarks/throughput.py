r"""Training throughput and memory of dlcore against the same models written plainly in PyTorch.

For each model (MLP on 28x28x1, the four-layer CIFAR ConvNet and ResNet-20 on 32x32x3) this runs dlcore's real
`train_step` (cross-entropy, SGD momentum 0.9, `jax.jit(step, donate_argnums=0)`) and a PyTorch twin with the
same layers, parameter count and initial weights (the logits of both are compared) -- eager NCHW, eager
channels_last (conv nets) and under torch.compile -- timing windows of steps ALTERNATELY in one process (order
A B C, C B A, ..., each after --settle_s idle) so machine noise hits every framework alike. The headline ratio is
against the fastest PyTorch variant. By default a
third runner, 'dlcore_tuned', runs the same step compiled with `--xla_options` (on CPU: convolutions kept out of
XLA's YNNPACK fusions), so the before/after of that setting is measured in the same run. Per model:

  images/s      median over timed windows after compile and warm-up; each window ends with
                `block_until_ready` (dlcore) / `torch.cuda.synchronize` (GPU). Ratios are medians over window
                pairs that ran back to back. Each window also records the CPU time of this process (images per
                CPU-second: an efficiency measure that contention distorts less) and the CPUs other processes
                used meanwhile (from /proc/stat), so a noisy machine shows in the results
  first step    dlcore: trace+lower, XLA compile and the first execution, separately; PyTorch: its first step
  memory        a fresh subprocess per framework and model: peak RSS (VmHWM, reset through
                /proc/self/clear_refs) minus the RSS after imports and runtime start-up, over model init + compile +
                first step and over the steady state; on GPU also the frameworks' own peak-allocation counters
  FLOPs         XLA's compiled `cost_analysis()` of the dlcore step and torch's FlopCounterMode (matmul/conv
                only) of the PyTorch step; achieved GFLOP/s and the fraction of a measured square-matmul peak

The input-pipeline section runs the trainer's data path -- `TrainBatches.batch_at(step)`, `jax.device_put`, the
jitted step dispatched asynchronously (and once more with on-device `--augment`) -- alternately with the same
step on a resident device batch, and reports the fraction of wall time the host loop spends fetching batches.

  python benchmarks/throughput.py                    # full CPU run, a few minutes; writes benchmarks/results/
  python benchmarks/throughput.py --quick            # about a minute
  python benchmarks/throughput.py --device=gpu --dtype=bfloat16

Needs the [bench] extra (torch==2.13.0).
"""

import copy
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app, flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dlcore import models, optim, parallel, train  # noqa: E402
from dlcore import state as state_lib  # noqa: E402
from dlcore.data import augment as augment_lib  # noqa: E402
from dlcore.data import pipeline  # noqa: E402
from dlcore.ops import conv as conv_ops  # noqa: E402
from benchmarks import machine_info  # noqa: E402

MODELS = ("mlp", "cifar_convnet", "resnet20")
# XLA:CPU (jax 0.10.2) sends dots, convolutions and reductions to YNNPACK by default; dlcore.parallel keeps the
# dots and reductions there and gives convolutions back to XLA's own (Eigen) emitter. 'dlcore' below is the plain
# jax.jit build (the before), 'dlcore_tuned' the build the trainer now uses (the after).
CPU_TUNED = ";".join(f"{k}={v}" for k, v in parallel.CPU_COMPILER_OPTIONS.items())

FLAGS = flags.FLAGS
flags.DEFINE_list("models", list(MODELS), f"Models to benchmark, from {MODELS}.")
flags.DEFINE_list("mlp_hidden", ["512", "512"], "MLP hidden widths.")
flags.DEFINE_integer("batch_size", 128, "Training batch size.")
flags.DEFINE_float("learning_rate", 0.01, "SGD learning rate (momentum 0.9).")
flags.DEFINE_integer("windows", 10, "Timed windows per runner and model.")
flags.DEFINE_float("window_s", 1.0, "Target seconds per timed window (whole steps, at least one).")
flags.DEFINE_integer("warmup_steps", 2, "Untimed steps after the first one, also used to size the windows.")
flags.DEFINE_float("settle_s", 0.5, "Idle seconds before every timed window. PyTorch's OpenMP threads keep "
                   "spinning after its steps and, without a pause, take CPU from the next window (benchmarks/README).")
flags.DEFINE_float("quiet_cpus", 0.25, "A window pair is 'quiet' when other processes used fewer CPUs than this "
                   "in both windows.")
flags.DEFINE_integer("threads", None, "Intra-op threads for PyTorch (default: the CPUs this process may use, "
                     "which is also what XLA's CPU runtime uses).")
flags.DEFINE_enum("device", "cpu", ["cpu", "gpu"], "Where both frameworks run.")
flags.DEFINE_enum("dtype", "float32", list(models.DTYPES), "Compute dtype. bfloat16: mixed precision, dlcore "
                  "through the models' dtype field as the trainer's model.dtype (float32 params, optimiser state, "
                  "loss and BatchNorm statistics); PyTorch through torch.autocast.")
flags.DEFINE_bool("donate", True, "Donate the train state to the jitted step (donate_argnums=0).")
flags.DEFINE_string("xla_options", "cpu-default", "Compiler options of the 'dlcore_tuned' runner, 'key=value' "
                    f"joined by ';'. 'cpu-default': {CPU_TUNED} on CPU, no tuned runner on GPU; '': none.")
flags.DEFINE_string("xla_flags", None, "Appended to XLA_FLAGS before the backend starts (affects every runner).")
flags.DEFINE_bool("torch", True, "Benchmark the PyTorch twins (otherwise dlcore alone).")
flags.DEFINE_bool("onednn", True, "Conv nets on CPU: also run 'dlcore_onednn', the trainer's build with "
                  "DLCORE_CPU_CONV=onednn (dlcore.ops.conv), when the extension is built.")
flags.DEFINE_bool("torch_compile", True, "Also time the PyTorch twin under torch.compile (inductor; needs a C++ "
                  "compiler on CPU). A compile that fails is reported and the runner dropped.")
flags.DEFINE_bool("memory", True, "Measure peak memory in a fresh subprocess per framework and model.")
flags.DEFINE_integer("memory_steps", 5, "Steady-state steps per memory subprocess.")
flags.DEFINE_bool("pipeline", True, "Benchmark the input pipeline.")
flags.DEFINE_list("pipeline_models", ["mlp", "cifar_convnet"], "Models for the pipeline section (ResNet-20's "
                  "step is so long that fetching is ~0.05% of it).")
flags.DEFINE_string("augment", "flip,crop", "On-device augmentation for the pipeline section ('' to skip).")
flags.DEFINE_integer("pipeline_windows", 6, "Timed windows per pipeline mode.")
flags.DEFINE_integer("pipeline_examples", 50_000, "Synthetic training-set size for the pipeline section.")
flags.DEFINE_bool("flops", True, "Report FLOPs per step, achieved GFLOP/s and a measured matmul peak.")
flags.DEFINE_bool("quick", False, "About 1.5 minutes on 2 cores: 3 windows of 0.5 s, 1 warm-up step, the "
                  "pipeline on the MLP only with 2 windows, no memory subprocesses unless --memory is given.")
flags.DEFINE_string("out_dir", os.path.join(_REPO, "benchmarks", "results"), "Where the JSON and the markdown "
                    "table go ('' writes nothing).")
flags.DEFINE_string("tag", None, "Results file stem (default: throughput_<device>[_bf16][_quick]).")
flags.DEFINE_integer("seed", 0, "Seed for data and initial weights.")
flags.DEFINE_string("worker", None, "Internal: '<framework>:<model>' runs one memory subprocess.")


# ---------------------------------------------------------------------------------------------------------------
# Models and data.

def input_shape(model: str) -> tuple[int, int, int]:
  return (28, 28, 1) if model == "mlp" else (32, 32, 3)


def describe(model: str) -> str:
  if model == "mlp":
    return f"MLP 784-{'-'.join(FLAGS.mlp_hidden)}-10, ReLU (28x28x1)"
  return {"cifar_convnet": "CIFAR ConvNet, 3x (conv5x5 32/32/64 + pool) + linear (32x32x3)",
          "resnet20": "ResNet-20, BatchNorm, 16/32/64 channels (32x32x3)"}[model]


def build_dlcore(model: str):
  """The dlcore model, computing in --dtype (the trainer's model.dtype: float32 params either way)."""
  dtype = models.compute_dtype(FLAGS.dtype)
  if model == "mlp":
    return models.get("mlp", hidden=tuple(int(h) for h in FLAGS.mlp_hidden), dtype=dtype)
  return models.get(model, dtype=dtype)


def synthetic(n: int, shape, seed: int) -> dict[str, np.ndarray]:
  """Images float32 NHWC in [0, 1] and int32 labels, as `dlcore.data.sources` delivers them."""
  rng = np.random.default_rng(seed)
  return {"image": rng.random((n, *shape), dtype=np.float32), "label": rng.integers(0, 10, n).astype(np.int32)}


def jax_device():
  try:
    return jax.devices(FLAGS.device)[0]
  except RuntimeError as e:
    raise app.UsageError(f"--device={FLAGS.device}: jax sees no such device ({e})") from e


def tuned_options() -> dict | None:
  """The compiler options of the 'dlcore_tuned' runner (None: no such runner)."""
  spec = FLAGS.xla_options
  if spec == "cpu-default":
    spec = CPU_TUNED if FLAGS.device == "cpu" else ""
  if not spec:
    return None
  options = {}
  for item in spec.split(";"):
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
      raise app.UsageError(f"--xla_options: expected 'key=value' items joined by ';', got {item!r}")
    value = value.strip()
    options[key.strip()] = {"true": True, "false": False}.get(value.lower(), value)
  return options


# ---------------------------------------------------------------------------------------------------------------
# dlcore.

class DlcoreRunner:
  """dlcore's jitted train_step on a device-resident batch, compiled ahead of time so compile time is known.

  `compiler_options` go to `Lowered.compile` (per-executable XLA debug options); `augment` names on-device ops;
  `conv_backend` ('xla' / 'onednn', dlcore.ops.conv) is the convolution backend the step is traced with: XLA's
  unless a runner asks for oneDNN, so 'dlcore' and 'dlcore_tuned' keep measuring XLA's convolutions.
  """

  def __init__(self, model: str, batch: dict, *, augment: str = "", compiler_options: dict | None = None,
               conv_backend: str = "xla"):
    self.device = jax_device()
    self.model = build_dlcore(model)
    tx = optim.optimizer("momentum", FLAGS.learning_rate, momentum=0.9)
    with jax.default_device(self.device):
      state = state_lib.create(self.model, tx, jnp.asarray(batch["image"]), FLAGS.seed)
    self.initial_params = jax.device_get(state.params)
    self.initial_batch_stats = jax.device_get(state.batch_stats)
    self.state = jax.device_put(state, self.device)
    self.batch = jax.device_put(batch, self.device)
    step = train.make_train_step(augment=augment_lib.make(augment) if augment else None)
    jitted = jax.jit(step, donate_argnums=0 if FLAGS.donate else ())
    t0 = time.perf_counter()
    with conv_ops.use_backend(conv_backend):
      lowered = jitted.lower(self.state, self.batch)
    t1 = time.perf_counter()
    self.compiled = lowered.compile(compiler_options=compiler_options)
    self.timings = {"lower_s": t1 - t0, "compile_s": time.perf_counter() - t1}
    self.metrics = None

  def param_count(self) -> int:
    return sum(int(np.size(a)) for a in jax.tree.leaves(self.initial_params))

  def memory_analysis(self) -> dict:
    """XLA's own buffer sizes for the executable, in MB (temp = the scratch arena: activations, gradients)."""
    m = self.compiled.memory_analysis()
    keys = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "generated_code_size_in_bytes")
    return {k.replace("_size_in_bytes", "_mb"): getattr(m, k) / 2 ** 20 for k in keys if hasattr(m, k)} if m else {}

  def flops(self) -> float | None:
    cost = self.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None

  def first_step(self) -> float:
    self.timings["first_step_s"] = self.run(1)
    self.timings["first_step_total_s"] = sum(self.timings[k] for k in ("lower_s", "compile_s", "first_step_s"))
    return self.timings["first_step_s"]

  def run(self, steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
      self.state, self.metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, self.metrics))
    return time.perf_counter() - t

  def last_loss(self) -> float:
    return float(self.metrics["loss"])

  def logits(self, images: np.ndarray) -> np.ndarray:
    """Train-mode forward pass of the initial weights (BatchNorm on batch statistics)."""
    variables = {"params": self.initial_params, "batch_stats": self.initial_batch_stats}
    out, _ = self.model.apply(variables, jnp.asarray(images), train=True, mutable=["batch_stats"],
                              rngs={"dropout": jax.random.key(0)})
    return np.asarray(out)


class PipelineRunner:
  """The trainer's data path on a DlcoreRunner's state and executable: batch_at(step) -> device_put -> step,
  dispatched asynchronously; counts the host time spent in batch_at and device_put."""

  def __init__(self, batches: pipeline.TrainBatches, dl: DlcoreRunner):
    self.batches, self.dl, self.step = batches, dl, 0
    self.reset_counters()

  def reset_counters(self):
    self.gather_s = self.put_s = self.total_s = 0.0
    self.timed_steps = 0

  def run(self, steps: int) -> float:
    dl = self.dl
    t = time.perf_counter()
    for _ in range(steps):
      t0 = time.perf_counter()
      host = self.batches.batch_at(self.step)
      t1 = time.perf_counter()
      batch = jax.device_put(host, dl.device)
      self.gather_s += t1 - t0
      self.put_s += time.perf_counter() - t1
      dl.state, dl.metrics = dl.compiled(dl.state, batch)
      self.step += 1
    jax.block_until_ready((dl.state, dl.metrics))
    elapsed = time.perf_counter() - t
    self.total_s += elapsed
    self.timed_steps += steps
    return elapsed


# ---------------------------------------------------------------------------------------------------------------
# PyTorch twins: same layers, shapes, initialiser family (He normal, zero biases) and optimiser.

@functools.cache
def torch_models():
  """(torch, build(model_name)) -- imported lazily: torch is the optional [bench] extra."""
  import torch
  from torch import nn
  import torch.nn.functional as F

  def he_init(module):
    for m in module.modules():
      if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if m.bias is not None:
          nn.init.zeros_(m.bias)

  def same_pad(x, kernel, stride, value=0.0):
    """TF/flax 'SAME' padding for stride 2 (extra row/column at the end), so outputs equal dlcore's."""
    size = x.shape[-1]
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return F.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2), value=value)

  class MLP(nn.Module):
    def __init__(self, hidden):
      super().__init__()
      widths = [784, *hidden]
      for i, (a, b) in enumerate(zip(widths, widths[1:])):
        setattr(self, f"layer{i}", nn.Linear(a, b))
      self.depth = len(hidden)
      self.classifier = nn.Linear(widths[-1], 10)
      he_init(self)

    def forward(self, x):
      x = x.flatten(1)
      for i in range(self.depth):
        x = F.relu(getattr(self, f"layer{i}")(x))
      return self.classifier(x)

  class CifarConvNet(nn.Module):
    flatten_hwc = (4, 4, 64)  # dlcore flattens NHWC; the classifier's rows are permuted when copying weights

    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 32, 5, padding=2)
      self.conv2 = nn.Conv2d(32, 32, 5, padding=2)
      self.conv3 = nn.Conv2d(32, 64, 5, padding=2)
      self.classifier = nn.Linear(4 * 4 * 64, 10)
      he_init(self)

    def forward(self, x):
      x = F.max_pool2d(same_pad(F.relu(self.conv1(x)), 3, 2, -float("inf")), 3, 2)
      x = F.avg_pool2d(same_pad(F.relu(self.conv2(x)), 3, 2), 3, 2)
      x = F.avg_pool2d(same_pad(F.relu(self.conv3(x)), 3, 2), 3, 2)
      return self.classifier(x.flatten(1))

  class Block(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.stride = stride
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=1 if stride == 1 else 0, bias=False)
      self.conv1_bn = nn.BatchNorm2d(cout, momentum=0.1)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=1, bias=False)
      self.conv2_bn = nn.BatchNorm2d(cout, momentum=0.1)
      self.has_shortcut = stride != 1 or cin != cout
      if self.has_shortcut:
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)
        self.shortcut_bn = nn.BatchNorm2d(cout, momentum=0.1)

    def forward(self, x):
      y = same_pad(x, 3, 2) if self.stride != 1 else x
      y = F.relu(self.conv1_bn(self.conv1(y)))
      y = self.conv2_bn(self.conv2(y))
      if self.has_shortcut:
        x = self.shortcut_bn(self.shortcut(x))
      return F.relu(x + y)

  class ResNet(nn.Module):
    def __init__(self, blocks_per_stage=3):
      super().__init__()
      self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
      self.stem_bn = nn.BatchNorm2d(16, momentum=0.1)
      cin, self.names = 16, []
      for stage, features in enumerate((16, 32, 64)):
        for block in range(blocks_per_stage):
          name = f"stage{stage}_block{block}"
          setattr(self, name, Block(cin, features, 2 if stage > 0 and block == 0 else 1))
          self.names.append(name)
          cin = features
      self.classifier = nn.Linear(64, 10)
      he_init(self)

    def forward(self, x):
      x = F.relu(self.stem_bn(self.stem(x)))
      for name in self.names:
        x = getattr(self, name)(x)
      return self.classifier(x.mean(dim=(2, 3)))

  def build(model):
    if model == "mlp":
      return MLP([int(h) for h in FLAGS.mlp_hidden])
    return {"cifar_convnet": CifarConvNet, "resnet20": ResNet}[model]()

  return torch, build


def load_dlcore_params(net, params: dict) -> None:
  """Copies dlcore's params into the PyTorch twin: 'a/linear/kernel' -> 'a.weight', 'a/bn_before/bn/scale' ->
  'a_bn.weight'; conv kernels HWIO -> OIHW, dense kernels transposed. Fails on any unmatched name."""
  import torch
  from flax import traverse_util
  target = net.state_dict()
  loaded = {}
  for path, value in traverse_util.flatten_dict(params).items():
    *units, leaf = [p for p in path if p != "linear"]
    if units[-2:] == ["bn_before", "bn"]:
      units = units[:-3] + [units[-3] + "_bn"]
    key = ".".join(units + [{"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]])
    value = np.asarray(value, np.float32)
    if leaf == "kernel" and value.ndim == 4:
      value = value.transpose(3, 2, 0, 1)
    elif leaf == "kernel":
      hwc = getattr(net, "flatten_hwc", None)
      if units == ["classifier"] and hwc is not None:  # NHWC flatten order -> NCHW flatten order
        value = value.reshape(*hwc, -1).transpose(2, 0, 1, 3).reshape(value.shape)
      value = value.T
    if key not in target or tuple(target[key].shape) != value.shape:
      raise ValueError(f"no PyTorch parameter {key} of shape {value.shape} for dlcore's {'/'.join(path)}")
    loaded[key] = torch.tensor(value)
  missing = [k for k, v in net.named_parameters() if k not in loaded]
  if missing:
    raise ValueError(f"PyTorch parameters without a dlcore counterpart: {missing}")
  net.load_state_dict(loaded, strict=False)


DLCORE_RUNNERS = ("dlcore", "dlcore_tuned", "dlcore_onednn")  # jax.jit; the trainer's build; + oneDNN convolutions
TORCH_RUNNERS = {"torch": ("nchw", False), "torch_channels_last": ("channels_last", False),
                 "torch_compile": ("channels_last", True)}  # name -> (memory format, torch.compile)


def torch_runner_names(model: str) -> list[str]:
  """The PyTorch variants run for `model`: NCHW eager always; channels_last eager for conv nets; torch.compile
  (channels_last for conv nets) with --torch_compile."""
  names = ["torch"] + (["torch_channels_last"] if model != "mlp" else [])
  return names + (["torch_compile"] if FLAGS.torch_compile else [])


class TorchRunner:
  """A plain PyTorch training step (zero_grad, forward, cross-entropy, backward, SGD momentum 0.9).

  layout 'channels_last' stores conv weights and the input NHWC in memory (PyTorch's fastest CPU layout for
  convolutions); compile=True runs the model through `torch.compile` (forward and backward by inductor).
  """

  def __init__(self, model: str, batch: dict, params: dict | None = None, *, layout: str = "nchw",
               compile: bool = False):  # pylint: disable=redefined-builtin
    self.torch, build = torch_models()
    torch = self.torch
    torch.manual_seed(FLAGS.seed)
    self.device = "cuda" if FLAGS.device == "gpu" else "cpu"
    self.net = build(model)
    self.param_count = sum(p.numel() for p in self.net.parameters())
    if params is not None:
      load_dlcore_params(self.net, params)
    self.net.to(self.device).train()
    self.x = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy()).to(self.device)
    if layout == "channels_last" and model != "mlp":
      self.net = self.net.to(memory_format=torch.channels_last)
      self.x = self.x.contiguous(memory_format=torch.channels_last)
    self.forward = torch.compile(self.net) if compile else self.net
    self.y = torch.from_numpy(batch["label"].astype(np.int64)).to(self.device)
    self.opt = torch.optim.SGD(self.net.parameters(), lr=FLAGS.learning_rate, momentum=0.9)
    self.loss = None
    self.timings = {}

  def sync(self):
    if self.device == "cuda":
      self.torch.cuda.synchronize()

  def step(self):
    torch = self.torch
    self.opt.zero_grad(set_to_none=True)
    with torch.autocast(self.device, dtype=torch.bfloat16, enabled=FLAGS.dtype == "bfloat16"):
      logits = self.forward(self.x)
    self.loss = torch.nn.functional.cross_entropy(logits.float(), self.y)
    self.loss.backward()
    self.opt.step()

  def first_step(self) -> float:
    t = time.perf_counter()
    self.run(1)
    self.timings["first_step_s"] = time.perf_counter() - t
    return self.timings["first_step_s"]

  def run(self, steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
      self.step()
    self.sync()
    return time.perf_counter() - t

  def last_loss(self) -> float:
    return self.loss.item()

  def flops(self) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
      self.step()
    return float(counter.get_total_flops())

  def logits(self, images: np.ndarray) -> np.ndarray:
    net = copy.deepcopy(self.net).train()
    with self.torch.no_grad():
      x = self.torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(self.device)
      return net(x).float().cpu().numpy()


# ---------------------------------------------------------------------------------------------------------------
# Timing.

def settings() -> dict:
  """Windows, window length, pipeline windows/models and memory steps, after --quick."""
  if FLAGS.quick:
    return dict(windows=min(FLAGS.windows, 3), window_s=min(FLAGS.window_s, 0.5), warmup_steps=1,
                pipeline_windows=min(FLAGS.pipeline_windows, 2), memory_steps=min(FLAGS.memory_steps, 2),
                pipeline_models=FLAGS.pipeline_models if FLAGS["pipeline_models"].present else ["mlp"])
  return dict(windows=FLAGS.windows, window_s=FLAGS.window_s, warmup_steps=FLAGS.warmup_steps,
              pipeline_windows=FLAGS.pipeline_windows, memory_steps=FLAGS.memory_steps,
              pipeline_models=FLAGS.pipeline_models)


def steps_for(runner, window_s: float, warmup: int) -> int:
  """Runs `warmup` steps (at least one) and returns the whole number of steps that fill `window_s`."""
  per_step = runner.run(max(warmup, 1)) / max(warmup, 1)
  return max(1, round(window_s / per_step))


def _cpu_jiffies() -> tuple[int, int]:
  """(busy jiffies of the whole machine, steal jiffies); busy excludes idle, iowait and steal."""
  with open("/proc/stat") as f:
    user, nice, system, _, _, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
  return user + nice + system + irq + softirq, steal


def timed_window(runner, steps: int) -> dict:
  """Seconds for `steps` steps, this process's CPU seconds, and the CPUs that other processes and the hypervisor
  (steal) took meanwhile."""
  hz = os.sysconf("SC_CLK_TCK")
  busy0, steal0 = _cpu_jiffies()
  cpu0 = time.process_time()
  elapsed = runner.run(steps)
  cpu = time.process_time() - cpu0
  busy1, steal1 = _cpu_jiffies()
  return {"seconds": elapsed, "cpu_seconds": cpu,
          "others": max(0.0, (busy1 - busy0) / hz - cpu) / elapsed, "steal": (steal1 - steal0) / hz / elapsed}


def alternate(runners: dict, steps: dict, windows: int, batch_size: int) -> dict[str, dict[str, list[float]]]:
  """`windows` timed windows of `steps[name]` steps per runner, in the order A B C, C B A, A B C, ...

  Returns per runner the lists 'rates' (images/s), 'cpu_rates' (images per CPU-second of this process),
  'cpus' (CPUs this process used), 'others' and 'steal' (CPUs used by other processes / the hypervisor).
  """
  names = list(runners)
  out = {n: {"rates": [], "cpu_rates": [], "cpus": [], "others": [], "steal": []} for n in names}
  for w in range(windows):
    for n in (names if w % 2 == 0 else names[::-1]):
      time.sleep(FLAGS.settle_s)  # lets the last runner's spinning OpenMP threads go idle first
      t = timed_window(runners[n], steps[n])
      images = steps[n] * batch_size
      out[n]["rates"].append(images / t["seconds"])
      out[n]["cpu_rates"].append(images / max(t["cpu_seconds"], 1e-9))
      out[n]["cpus"].append(t["cpu_seconds"] / t["seconds"])
      out[n]["others"].append(t["others"])
      out[n]["steal"].append(t["steal"])
  return out


def summary(timed: dict[str, list[float]], steps: int) -> dict:
  rates = timed["rates"]
  return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "steps_per_window": steps,
          "windows": [round(v, 2) for v in rates],
          "images_per_cpu_s_median": statistics.median(timed["cpu_rates"]),
          "cpus_used_median": statistics.median(timed["cpus"]),
          "other_processes_cpus": [round(v, 2) for v in timed["others"]],
          "steal_cpus": [round(v, 3) for v in timed["steal"]]}


def ratio(a: dict[str, list[float]], b: dict[str, list[float]], quiet: float) -> dict:
  """a/b over window pairs (each pair ran back to back): median, range, ratio of medians, the median ratio of
  images per CPU-second, and the median over 'quiet' pairs (other processes below `quiet` CPUs in both)."""
  pairs = [x / y for x, y in zip(a["rates"], b["rates"])]
  out = {"median_of_pairs": statistics.median(pairs), "min": min(pairs), "max": max(pairs),
         "of_medians": statistics.median(a["rates"]) / statistics.median(b["rates"]),
         "per_cpu_second_median_of_pairs": statistics.median(
             x / y for x, y in zip(a["cpu_rates"], b["cpu_rates"])),
         "pairs": [round(p, 4) for p in pairs]}
  calm = [p for p, oa, ob in zip(pairs, a["others"], b["others"]) if max(oa, ob) < quiet]
  out["quiet_pairs"] = len(calm)
  out["quiet_median_of_pairs"] = statistics.median(calm) if calm else None
  return out


def matmul_peak() -> dict:
  """Best-of-5 GFLOP/s of a square n x n matmul in jax and torch, per dtype: n=8192 on GPU, 2048 on CPU (512 for
  bfloat16 on CPU, which has no bfloat16 units here and would take minutes)."""
  dtypes = ["float32"] + (["bfloat16"] if FLAGS.dtype == "bfloat16" or FLAGS.device == "gpu" else [])
  sizes = {d: 8192 if FLAGS.device == "gpu" else 2048 if d == "float32" else 512 for d in dtypes}
  out = {"n": sizes}
  device = jax_device()
  for dtype in dtypes:
    n = sizes[dtype]
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    times = []
    for _ in range(5):
      t = time.perf_counter()
      mm(a).block_until_ready()
      times.append(time.perf_counter() - t)
    out[f"jax_{dtype}_gflops"] = 2 * n ** 3 / min(times) / 1e9
  if FLAGS.torch:
    torch, _ = torch_models()
    dev = "cuda" if FLAGS.device == "gpu" else "cpu"
    for dtype in dtypes:
      n = sizes[dtype]
      a = torch.ones((n, n), dtype=getattr(torch, dtype), device=dev)
      times = []
      for i in range(6):
        t = time.perf_counter()
        a @ a
        if dev == "cuda":
          torch.cuda.synchronize()
        if i:
          times.append(time.perf_counter() - t)
      out[f"torch_{dtype}_gflops"] = 2 * n ** 3 / min(times) / 1e9
  return out


# ---------------------------------------------------------------------------------------------------------------
# Memory: one fresh subprocess per framework and model.

MEMORY_METHOD = (
    "a fresh subprocess per framework and model. Baseline: VmRSS after imports, runtime start-up and the batch. "
    "Peak: VmHWM from /proc/self/status, reset through /proc/self/clear_refs just before the model is built and "
    "again after the first step. 'incl. compile' = peak over model init + XLA compile + first step, 'steady' = "
    "peak over the following steps, both minus the same baseline (so the executable and the state count in both).")


def _rss_kb() -> dict[str, int]:
  with open("/proc/self/status") as f:
    return {line.split(":")[0]: int(line.split()[1]) for line in f if line.startswith(("VmRSS", "VmHWM"))}


def _reset_peak() -> bool:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _peak_kb(resettable: bool) -> int:
  return _rss_kb()["VmHWM"] if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_worker(spec: str) -> dict:
  """Peak RSS (and device peak on GPU) of one framework training one model, relative to after start-up."""
  framework, model = spec.split(":")
  batch = synthetic(FLAGS.batch_size, input_shape(model), FLAGS.seed)
  if framework != "torch":
    jax.device_put(jnp.zeros(1), jax_device()).block_until_ready()  # start the runtime before the baseline
  else:
    torch, _ = torch_models()
    torch.set_num_threads(FLAGS.threads)
    torch.zeros(1, device="cuda" if FLAGS.device == "gpu" else "cpu").sum()
  resettable = _reset_peak()
  base = _rss_kb()["VmRSS"]
  if framework == "torch":
    runner = TorchRunner(model, batch)
  else:
    runner = DlcoreRunner(model, batch, compiler_options=tuned_options() if framework == "dlcore_tuned" else None)
  runner.first_step()
  first_peak = _peak_kb(resettable)
  _reset_peak()
  cfg = settings()
  steps = max(cfg["memory_steps"], steps_for(runner, cfg["window_s"], 1))
  elapsed = runner.run(steps)
  out = {"baseline_rss_mb": base / 1024, "peak_rss_delta_first_step_mb": (first_peak - base) / 1024,
         "peak_rss_delta_steady_mb": (_peak_kb(resettable) - base) / 1024, "peak_reset": resettable,
         "isolated_images_per_s": steps * FLAGS.batch_size / elapsed, "isolated_steps": steps}
  if not resettable:
    out["note"] = "clear_refs unavailable: peaks are ru_maxrss since process start"
  if FLAGS.device == "gpu":
    if framework != "torch":
      stats = runner.device.memory_stats() or {}
      out["device_peak_mb"] = stats.get("peak_bytes_in_use", float("nan")) / 2 ** 20
    else:
      out["device_peak_mb"] = runner.torch.cuda.max_memory_allocated() / 2 ** 20
  return out


def measure_memory(framework: str, model: str) -> dict:
  passed = ["mlp_hidden", "batch_size", "learning_rate", "threads", "device", "dtype", "donate", "xla_flags",
            "xla_options", "memory_steps", "window_s", "quick", "seed"]
  args = []
  for name in passed:
    value = getattr(FLAGS, name)
    if isinstance(value, bool):
      args.append(f"--{'' if value else 'no'}{name}")
    elif value is not None:
      args.append(f"--{name}={','.join(value) if isinstance(value, list) else value}")
  cmd = [sys.executable, os.path.abspath(__file__), f"--worker={framework}:{model}", *args]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode:
    return {"error": proc.stderr[-2000:]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# Sections.

def benchmark_model(model: str, cfg: dict) -> dict:
  """Alternating throughput of dlcore, dlcore_tuned and PyTorch on one model, plus first-step times and FLOPs."""
  bs = FLAGS.batch_size
  batch = synthetic(bs, input_shape(model), FLAGS.seed)
  runners = {"dlcore": DlcoreRunner(model, batch)}
  options = tuned_options()
  if options:
    runners["dlcore_tuned"] = DlcoreRunner(model, batch, compiler_options=options)
  if FLAGS.onednn and model != "mlp" and FLAGS.device == "cpu" and FLAGS.dtype == "float32":
    if conv_ops.onednn_available():
      runners["dlcore_onednn"] = DlcoreRunner(model, batch, compiler_options=options, conv_backend="onednn")
    else:
      print(f"[{model}] no dlcore_onednn runner: {conv_ops.onednn_status()}", flush=True)
  dl = runners["dlcore"]
  out = {"description": describe(model), "input_shape": [bs, *input_shape(model)],
         "param_count": {"dlcore": dl.param_count()}}
  if FLAGS.torch:
    tr = TorchRunner(model, batch, params=dl.initial_params)
    out["param_count"]["torch"] = tr.param_count
    if tr.param_count != dl.param_count():
      raise RuntimeError(f"{model}: parameter counts differ: {out['param_count']}")
    if FLAGS.dtype == "float32":
      out["initial_logits_max_abs_diff"] = float(np.abs(dl.logits(batch["image"]) - tr.logits(batch["image"])).max())
    runners["torch"] = tr
    for name in torch_runner_names(model)[1:]:
      layout, compiled = TORCH_RUNNERS[name]
      runners[name] = TorchRunner(model, batch, params=dl.initial_params, layout=layout, compile=compiled)
  for name, r in list(runners.items()):
    try:
      r.first_step()
    except Exception as e:  # pylint: disable=broad-except  (torch.compile: a missing compiler, an inductor bug)
      if name != "torch_compile":
        raise
      out["torch_compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
      print(f"[{model}] torch.compile failed, runner dropped: {out['torch_compile_error']}", flush=True)
      del runners[name]
      continue
    out[name] = dict(r.timings)
  first = ", ".join(f"{n} {r.timings.get('first_step_total_s', r.timings['first_step_s']):.2f} s" for n, r in
                    runners.items())
  check = (f"; initial logits max |diff| {out['initial_logits_max_abs_diff']:.1e}"
           if "initial_logits_max_abs_diff" in out else "")
  print(f"[{model}] params {out['param_count']}; first step (dlcore: lower+compile+run): {first}{check}", flush=True)

  steps = {n: steps_for(r, cfg["window_s"], cfg["warmup_steps"]) for n, r in runners.items()}
  timed = alternate(runners, steps, cfg["windows"], bs)
  for n, r in runners.items():
    out[n]["images_per_s"] = summary(timed[n], steps[n])
    out[n]["final_loss"] = r.last_loss()
  out["ratios"] = {}
  torch_names = [n for n in runners if n.startswith("torch")]
  if torch_names:  # the headline: against the fastest PyTorch variant of this run
    out["torch_fastest"] = max(torch_names, key=lambda n: out[n]["images_per_s"]["median"])
  pairs = [(a, b) for a in DLCORE_RUNNERS for b in torch_names] + [("dlcore_tuned", "dlcore"),
                                                                     ("dlcore_onednn", "dlcore_tuned")]
  for a, b in pairs:
    if a in runners and b in runners:
      out["ratios"][f"{a}/{b}"] = ratio(timed[a], timed[b], FLAGS.quiet_cpus)
  for a in DLCORE_RUNNERS:
    if torch_names and a in runners:
      out["ratios"][f"{a}/torch_fastest"] = out["ratios"][f"{a}/{out['torch_fastest']}"]
  for n, r in runners.items():
    if n.startswith("dlcore"):
      out[n]["xla_memory"] = r.memory_analysis()
  if FLAGS.flops:
    for n, r in runners.items():
      if n in ("dlcore", "dlcore_tuned", "torch"):
        out[n]["flops_per_step"] = r.flops()
        out[n]["flops_source"] = "torch FlopCounterMode" if n == "torch" else "XLA cost_analysis"
  others = [v for n in runners for v in timed[n]["others"]]
  out["other_processes_cpus_median"] = statistics.median(others)
  parts = [", ".join(f"{n} {out[n]['images_per_s']['median']:.1f}" for n in runners) + " img/s"]
  parts += [f"{k} {v['median_of_pairs']:.3f} [{v['min']:.2f}-{v['max']:.2f}]" for k, v in out["ratios"].items()
            if "fastest" not in k]
  parts.append(f"other processes used {out['other_processes_cpus_median']:.2f} CPUs")
  print(f"[{model}] " + "; ".join(parts), flush=True)
  return out


def benchmark_pipeline(model: str, cfg: dict) -> dict:
  """Resident batch vs the trainer's data path (batch_at + device_put + async step), +/- augmentation."""
  bs = FLAGS.batch_size
  data = synthetic(FLAGS.pipeline_examples, input_shape(model), FLAGS.seed + 1)
  batches = pipeline.TrainBatches(data, bs, seed=FLAGS.seed)
  resident = DlcoreRunner(model, batches.batch_at(0))
  runners = {"resident": resident, "pipeline": PipelineRunner(batches, resident)}  # one state and executable
  if FLAGS.augment:
    runners[f"pipeline+{FLAGS.augment}"] = PipelineRunner(
        batches, DlcoreRunner(model, batches.batch_at(0), augment=FLAGS.augment))
  steps = {}
  for name, r in runners.items():
    r.run(1)
    steps[name] = steps_for(r, cfg["window_s"], cfg["warmup_steps"])
    if isinstance(r, PipelineRunner):
      r.reset_counters()
  timed = alternate(runners, steps, cfg["pipeline_windows"], bs)
  out = {"examples": FLAGS.pipeline_examples, "modes": {}}
  for name, r in runners.items():
    mode = {"images_per_s": summary(timed[name], steps[name])}
    if isinstance(r, PipelineRunner):
      mode |= {"fetch_fraction": (r.gather_s + r.put_s) / r.total_s,
               "batch_at_ms_per_step": 1e3 * r.gather_s / r.timed_steps,
               "device_put_ms_per_step": 1e3 * r.put_s / r.timed_steps,
               "step_ms": 1e3 * r.total_s / r.timed_steps,
               "vs_resident": ratio(timed[name], timed["resident"], FLAGS.quiet_cpus)}
    out["modes"][name] = mode
    fetch = f", fetching {100 * mode['fetch_fraction']:.2f}% of wall time" if "fetch_fraction" in mode else ""
    print(f"[pipeline {model}] {name}: {mode['images_per_s']['median']:.1f} img/s{fetch}", flush=True)
  return out


# ---------------------------------------------------------------------------------------------------------------
# Report.

def machine() -> dict:
  info = machine_info.describe()
  if FLAGS.torch:
    torch, _ = torch_models()
    info |= {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
             "torch_parallel_info": torch.__config__.parallel_info().splitlines()[:6]}
  return info


def _fmt_ratio(r: dict | None) -> str:
  return "-" if r is None else f"**{r['median_of_pairs']:.2f}** [{r['min']:.2f}-{r['max']:.2f}]"


def markdown(result: dict) -> str:
  m, c = result["machine"], result["config"]
  names = [n for n in (*DLCORE_RUNNERS, *TORCH_RUNNERS) if any(n in r for r in result["models"].values())]
  label = {"dlcore": "dlcore", "dlcore_tuned": "dlcore tuned", "dlcore_onednn": "dlcore oneDNN conv",
           "torch": "PyTorch NCHW",
           "torch_channels_last": "PyTorch channels_last", "torch_compile": "PyTorch compile"}
  build = "dlcore_tuned" if "dlcore_tuned" in names else "dlcore"
  torch_names = [n for n in names if n.startswith("torch")]
  onednn = "dlcore_onednn" in names
  compile_errors = {k: r["torch_compile_error"] for k, r in result["models"].items() if "torch_compile_error" in r}
  lines = [
      f"# Training throughput: dlcore vs PyTorch ({c['device']}, {c['dtype']})", "",
      f"Machine: {m['cpu_model']} ({' '.join(m.get('cpu_isa', [])) or 'ISA unknown'}), "
      f"{m['usable_cpus']} usable CPUs (of {m['logical_cpus']}), "
      f"{m['memory_gib']:.0f} GiB RAM; {m['platform']}; python {m['python']}, jax {m['jax']}, "
      f"jaxlib {m.get('jaxlib')}, flax {m.get('flax')}, optax {m.get('optax')}, torch {m.get('torch', '-')} "
      f"({m.get('torch_threads', '-')} threads). XLA_FLAGS='{m['xla_flags']}', env {m['env'] or '{}'}, "
      f"niceness {m['niceness']}, {m.get('autogroup', '')}.", "",
      f"Command: `{result['command']}` ({result['runtime_s']:.0f} s). Load average before / after: "
      f"{result['loadavg_before']} / {result['loadavg_after']}.", "",
      f"Batch {c['batch_size']}, cross-entropy, SGD momentum 0.9 (lr {c['learning_rate']}), synthetic data "
      f"resident on the device. images/s: median of {c['windows']} windows of ~{c['window_s']} s per runner; "
      "runners alternate window by window (A B C, C B A, ...). Ratios: median over window pairs [min-max]."
      + (f" 'dlcore tuned' = the same step compiled with `{c['xla_options']}` (what the trainer runs)."
         if c.get("xla_options") else "")
      + (" 'dlcore oneDNN conv' = the trainer's build with oneDNN convolutions (conv nets; dlcore.ops.conv, the default "
         "since this runner was added); the other dlcore runners use XLA's (DLCORE_CPU_CONV=xla)."
         if "dlcore_onednn" in names else "")
      + " PyTorch runs eager in NCHW and in channels_last (conv nets; NHWC in memory, its fastest eager layout "
      "for convolutions on CPU) and under `torch.compile` (inductor, channels_last for conv nets); the headline "
      "ratio is against the fastest of them." + (" torch.compile failed here: " + "; ".join(
          f"{k}: {v}" for k, v in compile_errors.items()) + "." if compile_errors else ""), "",
      "| model | params | " + " | ".join(f"{label[n]} img/s" for n in names)
      + f" | **{label[build]} / fastest PyTorch** | " + " | ".join(f"{label[build]} / {label[n]}" for n in torch_names)
      + (" | tuned / dlcore" if build == "dlcore_tuned" else "")
      + (" | **oneDNN conv / fastest PyTorch** | oneDNN conv / tuned" if onednn else "")
      + " | other processes, CPUs (median) |",
      "|---" * (len(names) + len(torch_names) + 4 + (build == "dlcore_tuned") + 2 * onednn) + "|"]
  for r in result["models"].values():
    q = r["ratios"]
    fastest = label.get(r.get("torch_fastest"), "-")
    lines.append(f"| {r['description']} | {r['param_count']['dlcore']:,} | "
                 + " | ".join(f"{r[n]['images_per_s']['median']:.1f}" if n in r else "-" for n in names)
                 + f" | {_fmt_ratio(q.get(f'{build}/torch_fastest'))} ({fastest}) | "
                 + " | ".join(_fmt_ratio(q.get(f"{build}/{n}")) for n in torch_names)
                 + (f" | {_fmt_ratio(q.get('dlcore_tuned/dlcore'))}" if build == "dlcore_tuned" else "")
                 + (f" | {_fmt_ratio(q.get('dlcore_onednn/torch_fastest'))} | "
                    f"{_fmt_ratio(q.get('dlcore_onednn/dlcore_tuned'))}" if onednn else "")
                 + f" | {r['other_processes_cpus_median']:.2f} |")
  pairs = [p for p in ("dlcore/torch", "dlcore_tuned/torch", "dlcore_tuned/dlcore", f"{build}/torch_fastest",
                       "dlcore_onednn/dlcore_tuned")
           if any(p in r["ratios"] for r in result["models"].values())]
  lines += ["", "CPUs this process kept busy (median over windows; PyTorch's OpenMP threads spin while waiting, so "
            "they count as busy) and ratios of images per CPU-second (median over pairs). 'Other processes' is "
            "what the rest of the machine used during the windows: under raised priority it mostly fills the cores "
            "a runner leaves idle.", "",
            "| model | " + " | ".join(f"CPUs used: {label[n]}" for n in names) + " | "
            + " | ".join(f"per CPU-s {p}" for p in pairs) + " |", "|---" * (1 + len(names) + len(pairs)) + "|"]
  for k, r in result["models"].items():
    lines.append(f"| {k} | " + " | ".join(f"{r[n]['images_per_s']['cpus_used_median']:.2f}" if n in r else "-"
                                         for n in names) + " | "
                 + " | ".join(f"{r['ratios'][p]['per_cpu_second_median_of_pairs']:.2f}" if p in r["ratios"] else "-"
                              for p in pairs) + " |")
  lines += ["", "## First step and memory", "",
            "| model | runner | first step s | peak RSS delta MB, steady | incl. compile | XLA temp arena MB | "
            "isolated img/s |", "|---" * 7 + "|"]
  for r in result["models"].values():
    for n in names:
      if n not in r:
        continue
      t, x = r[n], r.get("memory", {}).get(n) or {}
      first = (f"{t['first_step_total_s']:.2f} ({t['lower_s']:.2f} lower + {t['compile_s']:.2f} compile + "
               f"{t['first_step_s']:.2f} run)" if "compile_s" in t else f"{t['first_step_s']:.2f}")
      if "error" in x:
        mem = ["error"] * 2 + ["-"]
      elif x:
        mem = [f"{x['peak_rss_delta_steady_mb']:.0f}", f"{x['peak_rss_delta_first_step_mb']:.0f}",
               f"{x['isolated_images_per_s']:.1f}"]
        if "device_peak_mb" in x:
          mem[0] += f" (device {x['device_peak_mb']:.0f})"
      else:
        mem = ["-"] * 3
      temp = f"{t['xla_memory']['temp_mb']:.0f}" if t.get("xla_memory", {}).get("temp_mb") is not None else "-"
      lines.append(f"| {r['description']} | {label[n]} | {first} | {mem[0]} | {mem[1]} | {temp} | {mem[2]} |")
  if result.get("memory_method"):
    lines += ["", f"Memory: {result['memory_method']} 'isolated img/s': the steady steps of that subprocess "
              "(at least one window), one framework alone. XLA temp arena: `compiled.memory_analysis()`."]
  if result.get("matmul_peak"):
    p = result["matmul_peak"]
    peaks = ", ".join(f"{k[:-7]} {v:.1f} GFLOP/s" for k, v in p.items() if k.endswith("_gflops"))
    sizes = ", ".join(f"{d} n={n}" for d, n in p["n"].items())
    lines += ["", f"## FLOPs (square matmul peak, {sizes}, best of 5: {peaks})", "",
              "| model | XLA FLOPs/step (cost_analysis) | PyTorch FLOPs/step (FlopCounterMode) | "
              + " | ".join(f"{label[n]} GFLOP/s (% of peak)" for n in names) + " |", "|---" * (3 + len(names)) + "|"]
    for k, r in result["models"].items():
      cells = []
      for n in names:
        x = r.get(n, {})
        cells.append(f"{x['achieved_gflops']:.1f} ({100 * x['fraction_of_matmul_peak']:.0f}%)"
                     if x.get("achieved_gflops") else "-")
      torch_flops = r.get("torch", {}).get("flops_per_step")
      torch_flops = f"{torch_flops:.3g}" if torch_flops else "-"
      lines.append(f"| {k} | {r['dlcore']['flops_per_step']:.3g} | {torch_flops} | " + " | ".join(cells) + " |")
  if result.get("pipeline"):
    lines += ["", "## Input pipeline (dlcore, default compile options)", "",
              "The trainer's data path: `TrainBatches.batch_at(step)` (numpy gather from a synthetic float32 set of "
              f"{FLAGS.pipeline_examples} examples) + `jax.device_put` + the jitted step dispatched asynchronously, "
              "alternated window by window with the same executable on a resident device batch ('resident'). "
              "fetch % = host time in batch_at + device_put / wall time.", "",
              "| model | mode | img/s | vs resident [min-max] | fetch % of wall time | batch_at ms/step | "
              "device_put ms/step | step ms |", "|---" * 8 + "|"]
    for k, p in result["pipeline"].items():
      for mode, x in p["modes"].items():
        if "fetch_fraction" in x:
          q = x["vs_resident"]
          lines.append(f"| {k} | {mode} | {x['images_per_s']['median']:.1f} | {q['median_of_pairs']:.3f} "
                       f"[{q['min']:.2f}-{q['max']:.2f}] | {100 * x['fetch_fraction']:.2f}% | "
                       f"{x['batch_at_ms_per_step']:.3f} | {x['device_put_ms_per_step']:.3f} | {x['step_ms']:.1f} |")
        else:
          lines.append(f"| {k} | {mode} | {x['images_per_s']['median']:.1f} | 1 | - | - | - | "
                       f"{1e3 * FLAGS.batch_size / x['images_per_s']['median']:.1f} |")
  lines += ["", f"GPU: {result['gpu']}", ""]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FLAGS.xla_flags).strip()
  if FLAGS.threads is None:
    FLAGS.threads = len(os.sched_getaffinity(0))
  for flag in ("models", "pipeline_models"):
    unknown = sorted(set(getattr(FLAGS, flag) or []) - set(MODELS))
    if unknown:
      raise app.UsageError(f"--{flag}: unknown {unknown}; choose from {MODELS}")
  if FLAGS.device == "cpu":
    jax.config.update("jax_platforms", "cpu")
  if FLAGS.worker:
    print(json.dumps(memory_worker(FLAGS.worker)))
    return
  jax_device()
  tuned_options()  # validate early
  if FLAGS.torch:
    torch, _ = torch_models()
    torch.set_num_threads(FLAGS.threads)
    if FLAGS.device == "gpu" and not torch.cuda.is_available():
      raise app.UsageError("--device=gpu: torch sees no CUDA device (install a CUDA build, or pass --notorch)")
  cfg = settings()
  start = time.perf_counter()
  load_before = machine_info.loadavg()
  options = tuned_options()
  result = {"command": " ".join(["python", "benchmarks/throughput.py", *sys.argv[1:]]),
            "config": {"models": FLAGS.models, "mlp_hidden": [int(h) for h in FLAGS.mlp_hidden],
                       "batch_size": FLAGS.batch_size, "learning_rate": FLAGS.learning_rate, "momentum": 0.9,
                       "device": FLAGS.device, "dtype": FLAGS.dtype, "donate": FLAGS.donate,
                       "xla_options": ";".join(f"{k}={v}" for k, v in options.items()) if options else None,
                       "threads": FLAGS.threads, "quick": FLAGS.quick,
                       "quiet_cpus": FLAGS.quiet_cpus, **cfg},
            "loadavg_before": load_before, "machine": machine(), "models": {}}
  for model in FLAGS.models:
    result["models"][model] = benchmark_model(model, cfg)
  if FLAGS.flops:
    result["matmul_peak"] = peak = matmul_peak()
    for r in result["models"].values():
      for n in ("dlcore", "dlcore_tuned", *TORCH_RUNNERS):
        flops = r.get(n, {}).get("flops_per_step") or (n in r and r.get("torch", {}).get("flops_per_step"))
        if flops:  # the PyTorch variants run the same model: the NCHW twin's count
          key = f"{'torch' if n.startswith('torch') else 'jax'}_{FLAGS.dtype}_gflops"
          r[n]["achieved_gflops"] = flops * r[n]["images_per_s"]["median"] / FLAGS.batch_size / 1e9
          r[n]["fraction_of_matmul_peak"] = r[n]["achieved_gflops"] / peak[key]
  if FLAGS.pipeline:
    result["pipeline"] = {m: benchmark_pipeline(m, cfg) for m in cfg["pipeline_models"]}
  if FLAGS.memory and (not FLAGS.quick or FLAGS["memory"].present):
    result["memory_method"] = MEMORY_METHOD
    for model in FLAGS.models:
      frameworks = ["dlcore"] + (["dlcore_tuned"] if options else []) + (["torch"] if FLAGS.torch else [])
      mem = {fw: measure_memory(fw, model) for fw in frameworks}
      result["models"][model]["memory"] = mem
      print(f"[memory {model}] " + "; ".join(
          f"{fw}: steady {x['peak_rss_delta_steady_mb']:.0f} MB, incl. compile "
          f"{x['peak_rss_delta_first_step_mb']:.0f} MB" if "error" not in x else f"{fw}: {x['error'][-300:]}"
          for fw, x in mem.items()), flush=True)
  result["gpu"] = (f"measured on {result['machine']['jax_devices'][0]}" if FLAGS.device == "gpu" else
                   "not measured: no GPU lent (run with --device=gpu, optionally --dtype=bfloat16)")
  result["runtime_s"] = time.perf_counter() - start
  result["loadavg_after"] = machine_info.loadavg()
  table = markdown(result)
  print(table)
  tag = FLAGS.tag or "throughput_" + FLAGS.device + ("_bf16" if FLAGS.dtype == "bfloat16" else "") + (
      "_quick" if FLAGS.quick else "")
  machine_info.write_results(FLAGS.out_dir, tag, result, table)


if __name__ == "__main__":
  app.run(main)
