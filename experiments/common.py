"""Output helpers shared by the experiment binaries: atomic files, the workdir, tables and plots."""

import csv
import io
import json
import os
import sys
import tempfile

from absl import app
from absl import flags
from absl import logging
import matplotlib

matplotlib.use("Agg")  # headless: plots go to PNG files
import matplotlib.pyplot as plt  # noqa: E402


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def atomic_write(path: str, data: str | bytes) -> None:
  """Writes `data` to `path` through a temporary file and os.replace, so readers never see half a file; the
  file gets an ordinary file's permissions (0666 less the umask), not mkstemp's private 0600."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def write_json(path: str, obj) -> None:
  atomic_write(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(path: str, header: list[str], rows: list[list]) -> None:
  buf = io.StringIO()
  writer = csv.writer(buf)
  writer.writerow(header)
  writer.writerows(rows)
  atomic_write(path, buf.getvalue())


def save_figure(fig, path: str) -> None:
  """Saves a matplotlib figure as PNG atomically and closes it."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
  plt.close(fig)
  atomic_write(path, buf.getvalue())


def format_table(header: list[str], rows: list[list]) -> str:
  """A plain-text table; floats with 4 significant digits."""
  cells = [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in [header, *rows]]
  widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def run_main(main, module_name: str) -> None:
  """`app.run(main)` with `--help` listing the flags of `module_name`: absl lists those of the __main__ module,
  which for an installed console script is a wrapper defining none."""
  for flag in flags.FLAGS.get_key_flags_for_module(module_name):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  main_module = sys.modules["__main__"]
  if not main_module.__doc__:  # absl prints it above the flags
    main_module.__doc__ = sys.modules[module_name].__doc__
  app.run(main)


def quiet_logs() -> None:
  """Keeps absl INFO lines (orbax writes many per checkpoint) out of the progress output unless -v is given."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
