"""The machine a benchmark ran on: CPU model and ISA, usable cores, memory, load settings, library versions; and
what every benchmark shares: alternating timed windows, writing results."""

import json
import os
import platform

import jax

__all__ = ["alternate", "describe", "loadavg", "write_results"]


def describe() -> dict:
  """What results files record about the machine (torch details are added by the scripts that use torch)."""
  cpu, isa = "unknown", []
  try:
    with open("/proc/cpuinfo") as f:
      first_cpu = f.read().split("\n\n")[0].splitlines()
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first_cpu)}
    cpu = fields.get("model name", cpu)
    cpu_flags = set(fields.get("flags", "").split())
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags]
  except OSError:
    pass
  try:
    with open("/proc/meminfo") as f:
      mem_gib = int(f.readline().split()[1]) / 2 ** 20
  except OSError:
    mem_gib = None
  info = {"cpu_model": cpu, "cpu_isa": isa, "logical_cpus": os.cpu_count(),
          "usable_cpus": len(os.sched_getaffinity(0)),
          "memory_gib": mem_gib, "platform": platform.platform(), "python": platform.python_version(),
          "jax": jax.__version__, "jax_devices": [str(d) for d in jax.devices()],
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "niceness": os.nice(0),
          "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")
                  if k in os.environ}}
  try:
    with open("/proc/self/autogroup") as f:
      info["autogroup"] = f.read().strip()
  except OSError:
    pass
  for pkg in ("jaxlib", "flax", "optax", "numpy"):
    try:
      info[pkg] = __import__(pkg).__version__
    except ImportError:
      pass
  return info


def loadavg() -> str:
  """The 1, 5 and 15 minute load averages."""
  with open("/proc/loadavg") as f:
    return " ".join(f.read().split()[:3])


def write_results(out_dir: str, tag: str, result: dict, table: str) -> None:
  """Writes `out_dir`/`tag`.json (the result) and .md (its table); nothing when out_dir is ''."""
  if not out_dir:
    return
  os.makedirs(out_dir, exist_ok=True)
  for ext, text in (("json", json.dumps(result, indent=2) + "\n"), ("md", table)):
    with open(os.path.join(out_dir, f"{tag}.{ext}"), "w") as f:
      f.write(text)
  print(f"wrote {os.path.join(out_dir, tag)}.json and .md")


def alternate(runners: dict, windows: int) -> dict[str, list]:
  """What each runner (a callable timing one window) returns per window, the runners in the order A B C, C B A,
  ... so that noise hits all of them."""
  names, out = list(runners), {n: [] for n in runners}
  for w in range(windows):
    for n in (names if w % 2 == 0 else names[::-1]):
      out[n].append(runners[n]())
  return out
