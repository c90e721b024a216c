"""Output helpers shared by the experiment binaries: atomic files, the workdir, tables and plots."""

import csv
import io
import json
import logging as pylogging
import math
import os
import sys
import shutil
import tempfile

from absl import app
from absl import flags
from absl import logging
import matplotlib

matplotlib.use("Agg")  # headless: plots go to PNG files
import matplotlib.pyplot as plt  # noqa: E402

from . import config_lib  # noqa: E402


def _umask() -> int:
  """The process umask, read without changing it where Linux shows it (os.umask would race other threads)."""
  try:
    with open("/proc/self/status") as f:
      return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
  except (OSError, StopIteration, ValueError):
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


def finite_or_none(value) -> float | None:
  """`value` as a float, or None (JSON null) when it is NaN or infinite."""
  value = float(value)
  return value if math.isfinite(value) else None


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
  """Keeps absl INFO lines (orbax writes many per checkpoint) out of the progress output unless -v is given, and
  drops the unraisable-exception reports of orbax's abandoned reads and writes after a failed restore or save
  (the binaries report the failure itself in one line)."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
    # orbax logs a failed background save from each of its threads with a traceback; the binaries report the
    # failure themselves, in one line.
    pylogging.getLogger("absl").addFilter(
        lambda record: not (record.levelno >= pylogging.ERROR and "orbax" in record.pathname))
  default_hook = sys.unraisablehook

  def hook(unraisable):
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None and "orbax" in code.co_filename:
      return
    # TensorStore's callbacks into an event loop orbax already closed, after a failed save.
    if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed":
      return
    default_hook(unraisable)

  sys.unraisablehook = hook


class WorkdirLock:
  """An OS-level lock (`fcntl.flock` on WORKDIR/.lock) held for a whole run, so two runs never share a workdir.

  The lock file records the holder's host, pid and start time. A second run on a locked workdir raises
  `WorkdirBusy` naming the holder. The OS releases the lock when its process dies, so a lock file left by a
  dead run is taken over, with a message naming it. `created` says whether acquiring made the folder (so a
  rejected run can remove it again). On a filesystem without flock (some network mounts) the lock is advisory
  only.
  """

  def __init__(self, workdir: str, log=print):
    self.workdir, self.path, self._log = workdir, os.path.join(workdir, ".lock"), log
    self._fd, self.created = None, False

  def __enter__(self) -> "WorkdirLock":
    import fcntl  # pylint: disable=g-import-not-at-top
    import socket  # pylint: disable=g-import-not-at-top
    import time  # pylint: disable=g-import-not-at-top
    self.created = not os.path.exists(self.workdir)
    os.makedirs(self.workdir, exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise WorkdirBusy(f"--workdir {self.workdir} is in use by {holder}; wait for it to finish or use another "
                          "--workdir") from None
      if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
        break  # the file we locked is still the lock file (not one a finishing run just removed)
      os.close(fd)
    previous = os.read(fd, 4096).decode(errors="replace").strip()
    if previous:
      self._log(f"taking over the lock of {previous}, which is no longer running")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})"
             .encode())
    self._fd = fd
    return self

  def release(self, *, remove_workdir: bool = False) -> None:
    """Removes the lock file and releases the lock; `remove_workdir` also removes the folder if it is empty."""
    if self._fd is None:
      return
    os.remove(self.path)
    os.close(self._fd)
    self._fd = None
    if remove_workdir:
      try:
        os.rmdir(self.workdir)
      except OSError:
        pass

  def __exit__(self, *exc) -> None:
    self.release()


class WorkdirBusy(RuntimeError):
  """Another live run holds the workdir's lock."""


def check_study_workdir(workdir: str, config, *, binary: str, resumable_keys, overwrite: bool, what: str) -> None:
  """Refuses a workdir holding a `what` (e.g. 'sweep') with another config, keys in `resumable_keys` aside
  (ValueError naming each changed key); `overwrite` clears the workdir instead (its lock file aside)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  if not overwrite:
    try:
      old = config_lib.flat(config_lib.load(path, binary))
    except config_lib.ConfigError as e:
      raise ValueError(f"--workdir {workdir} holds a config.json that cannot be read ({e}); pass --overwrite") from None
    new = config_lib.flat(config)
    diff = sorted(k for k in new if k not in resumable_keys and old[k] != new[k])
    if diff:
      changes = ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in diff)
      raise ValueError(f"--workdir {workdir} holds a {what} with a different config ({changes}); pass --overwrite "
                       "to discard it, or use another --workdir")
    return
  for name in os.listdir(workdir):
    if name != ".lock":
      target = os.path.join(workdir, name)
      shutil.rmtree(target) if os.path.isdir(target) and not os.path.islink(target) else os.remove(target)


def run_study_locked(run, config, workdir: str, *, binary: str, resumable_keys, overwrite: bool, what: str, log):
  """`run(config, workdir, log=log)` under the workdir's lock, after `check_study_workdir` (a workdir it refuses
  and this call created is removed again) and writing config.json; returns what `run` returns."""
  with WorkdirLock(workdir, log=log) as lock:
    try:
      check_study_workdir(workdir, config, binary=binary, resumable_keys=resumable_keys, overwrite=overwrite,
                          what=what)
    except ValueError:
      lock.release(remove_workdir=lock.created)
      raise
    write_json(os.path.join(workdir, "config.json"), config_lib.to_json_dict(config, binary))
    return run(config, workdir, log=log)
