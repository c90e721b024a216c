"""Random-search spaces for coarse-to-fine hyperparameter search (cs231n): parse, sample, narrow, find edges.

A space maps hyperparameter names to `Dimension`s: 'log' (log-uniform on [low, high]), 'uniform' (uniform on
[low, high]) or 'choice' (one of the listed values, uniformly). Its text form, one entry per hyperparameter:

  "learning_rate=log:1e-3:1, weight_decay=log:1e-6:1e-2, momentum=uniform:0.5:0.99, label_smoothing=choice:0:0.1"

`narrow` builds the next stage's space around the best settings of a stage (in log space for log dimensions);
where the best settings crowd an end of a range the new range reaches past that end, and `narrow` says so.
`edge` says whether a value lies at the low or high end of its range, where a search must widen its range
rather than trust the value.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import math

import numpy as np

__all__ = ["KINDS", "Bounds", "Dimension", "edge", "narrow", "parse", "sample", "to_text"]

KINDS = ("log", "uniform", "choice")
# The values a hyperparameter may take: (low, low_open, high, high_open).
Bounds = tuple[float, bool, float, bool]


@dataclasses.dataclass(frozen=True)
class Dimension:
  """One hyperparameter's range: kind 'log' or 'uniform' on [low, high], or 'choice' among `choices`."""
  kind: str
  low: float = math.nan
  high: float = math.nan
  choices: tuple[float, ...] = ()

  def scale(self, values) -> np.ndarray:
    """Values in the dimension's own scale (log10 for 'log'), where sampling is uniform."""
    values = np.asarray(values, np.float64)
    return np.log10(values) if self.kind == "log" else values

  def unscale(self, values) -> np.ndarray:
    """The inverse of `scale`: values in the dimension's own scale back to hyperparameter values."""
    values = np.asarray(values, np.float64)
    return 10.0 ** values if self.kind == "log" else values

  def text(self) -> str:
    """The range in the text form `parse` reads after 'NAME=' (e.g. 'log:0.001:1')."""
    numbers = self.choices if self.kind == "choice" else (self.low, self.high)
    return ":".join([self.kind, *(f"{v:.6g}" for v in numbers)])


def _within(name: str, value: float, bounds: Bounds, arg: str) -> None:
  low, low_open, high, high_open = bounds
  if value < low or (low_open and value == low) or value > high or (high_open and value == high):
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    raise ValueError(f"{arg}: {name} value {value:g} is outside {interval}, the values {name} may take")


def parse(text: str, bounds: Mapping[str, Bounds], *, arg: str = "space") -> dict[str, Dimension]:
  """{name: Dimension} from the text form; `bounds` names the searchable hyperparameters and their valid values.

  ValueError naming `arg` for: no entry, a malformed entry, an unknown or repeated name, an unknown kind, a value
  that is not a number, an empty or inverted range, a log range touching zero, a value outside the bounds."""
  entries = [e.strip() for e in text.split(",") if e.strip()]
  if not entries:
    raise ValueError(f"{arg} names no hyperparameter; give e.g. 'learning_rate=log:1e-3:1, momentum=uniform:0.5:0.99'")
  space = {}
  for entry in entries:
    name, sep, spec = (part.strip() for part in entry.partition("="))
    fields = [f.strip() for f in spec.split(":")]
    if not sep or not name or len(fields) < 2:
      raise ValueError(f"{arg} entry {entry!r} must be NAME=log:LOW:HIGH, NAME=uniform:LOW:HIGH or "
                       "NAME=choice:V1:V2:...")
    if name not in bounds:
      raise ValueError(f"{arg}: unknown hyperparameter {name!r}; searchable: {', '.join(bounds)}")
    if name in space:
      raise ValueError(f"{arg} names {name} twice")
    kind = fields[0].lower()
    if kind not in KINDS:
      raise ValueError(f"{arg}: {name}: kind {fields[0]!r} is not one of {', '.join(KINDS)}")
    try:
      numbers = [float(f) for f in fields[1:]]
    except ValueError:
      raise ValueError(f"{arg}: {name}: {':'.join(fields[1:])!r} are not all numbers") from None
    if not all(math.isfinite(v) for v in numbers):
      raise ValueError(f"{arg}: {name}: values must be finite, got {numbers}")
    for value in numbers:
      _within(name, value, bounds[name], arg)
    if kind == "choice":
      if len(set(numbers)) != len(numbers):
        raise ValueError(f"{arg}: {name}: a choice lists a value twice: {numbers}")
      space[name] = Dimension("choice", choices=tuple(numbers))
      continue
    if len(numbers) != 2:
      raise ValueError(f"{arg}: {name}={kind} takes LOW:HIGH, got {len(numbers)} value(s)")
    low, high = numbers
    if not low < high:
      raise ValueError(f"{arg}: {name}: the range [{low:g}, {high:g}] is {'empty' if low == high else 'inverted'}; "
                       "LOW must be below HIGH")
    if kind == "log" and low <= 0:
      raise ValueError(f"{arg}: {name}: a log range must lie above 0, got [{low:g}, {high:g}] (use uniform to "
                       "include 0)")
    space[name] = Dimension(kind, low, high)
  return space


def to_text(space: Mapping[str, Dimension]) -> str:
  """The text form `parse` reads."""
  return ", ".join(f"{name}={dim.text()}" for name, dim in space.items())


def sample(space: Mapping[str, Dimension], n: int, rng: np.random.Generator) -> list[dict[str, float]]:
  """n settings drawn independently per dimension (uniform in the dimension's own scale)."""
  columns = {}
  for name, dim in space.items():
    if dim.kind == "choice":
      columns[name] = rng.choice(np.asarray(dim.choices), n)
    else:
      columns[name] = dim.unscale(rng.uniform(*dim.scale([dim.low, dim.high]), n))
  return [{name: float(columns[name][i]) for name in space} for i in range(n)]


def narrow(space: Mapping[str, Dimension], best: Sequence[Mapping[str, float]], bounds: Mapping[str, Bounds], *,
           edge_fraction: float = 0.1, margin: float = 0.25,
           min_span: float = 0.2) -> tuple[dict[str, Dimension], list[dict]]:
  """(the next stage's space, the ends that moved past the old ranges) around the settings `best` (the top k).

  A numeric range becomes [lo - pad, hi + pad] in the dimension's own scale, where [lo, hi] spans the best
  values and pad = margin x max(hi - lo, min_span x the old range's width), cut to the bounds. It reaches past
  an end of the old range only where a best value lies at that end (`edge` with `edge_fraction`): the search
  widens there, and says so ({name, side, old, new}); elsewhere it stays inside the old range. A choice keeps
  the values the best settings use."""
  new, widened = {}, []
  for name, dim in space.items():
    values = [s[name] for s in best]
    if dim.kind == "choice":
      new[name] = Dimension("choice", choices=tuple(v for v in dim.choices if v in values))
      continue
    old_low, old_high = dim.scale([dim.low, dim.high])
    lo, hi = dim.scale([min(values), max(values)])
    pad = margin * max(hi - lo, min_span * (old_high - old_low))
    low, high = (float(v) for v in dim.unscale([lo - pad, hi + pad]))
    b_low, b_low_open, b_high, b_high_open = bounds[name]
    sides = {edge(dim, v, edge_fraction) for v in values}
    low = max(low, np.nextafter(b_low, math.inf) if b_low_open else b_low, -math.inf if "low" in sides else dim.low)
    high = min(high, np.nextafter(b_high, -math.inf) if b_high_open else b_high,
               math.inf if "high" in sides else dim.high)
    for side, old, value, moved in (("low", dim.low, low, low < dim.low), ("high", dim.high, high, high > dim.high)):
      if moved:
        widened.append({"name": name, "side": side, "old": old, "new": value})
    new[name] = Dimension(dim.kind, low, high)
  return new, widened


def edge(dim: Dimension, value: float, fraction: float) -> str | None:
  """'low' or 'high' when `value` lies within `fraction` of the range's width (in its own scale) of that end, or
  beyond it; None inside, and for choices."""
  if dim.kind == "choice":
    return None
  low, high, v = dim.scale([dim.low, dim.high, value])
  position = (v - low) / (high - low)
  return "low" if position <= fraction else "high" if position >= 1 - fraction else None
