"""Name lookup and argument validation shared by every registry and public constructor.

Errors name the argument, the value given and what is allowed, so a bad flag is fixed from the message alone.
"""

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


def lookup(kind: str, table: Mapping[str, T], name: str) -> T:
  """Returns `table[name]`, or raises a ValueError listing the valid names of this `kind`."""
  key = name.lower() if isinstance(name, str) else name
  if key not in table:
    raise ValueError(f"unknown {kind} {name!r}; valid names: {', '.join(sorted(table))}")
  return table[key]


def positive(arg: str, value: float) -> float:
  """Requires value > 0."""
  if not value > 0:
    raise ValueError(f"{arg} must be > 0, got {value!r}")
  return value


def non_negative(arg: str, value: float) -> float:
  """Requires value >= 0."""
  if not value >= 0:
    raise ValueError(f"{arg} must be >= 0, got {value!r}")
  return value


def in_range(arg: str, value: float, low: float, high: float, *, low_open: bool = False,
             high_open: bool = False) -> float:
  """Requires value in the interval low..high, each end open or closed as asked."""
  ok_low = value > low if low_open else value >= low
  ok_high = value < high if high_open else value <= high
  if not (ok_low and ok_high):
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    raise ValueError(f"{arg} must be in {interval}, got {value!r}")
  return value


def one_of(arg: str, value: str, allowed: tuple[str, ...]) -> str:
  """Requires value to be one of `allowed`."""
  if value not in allowed:
    raise ValueError(f"{arg} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
  return value
