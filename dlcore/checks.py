"""Name lookup and argument validation shared by every registry and public constructor.

Errors name the argument, the value given and what is allowed, so a bad flag is fixed from the message alone.
The numeric checks pass traced values (inside jit or vmap, e.g. a population member's hyperparameter) through
unchecked: whoever made the traced value checks its concrete values (dlcore.population does, per member).
"""

from collections.abc import Mapping
from typing import TypeVar

import jax

__all__ = ["in_range", "is_traced", "lookup", "non_negative", "one_of", "positive"]

T = TypeVar("T")


def lookup(kind: str, table: Mapping[str, T], name: str) -> T:
  """Returns `table[name]`, or raises a ValueError listing the valid names of this `kind` (e.g. 'optimizer').
  A string name is lower-cased first ('ReLU' finds 'relu'), so the keys of `table` must be lower-case."""
  key = name.lower() if isinstance(name, str) else name
  if key not in table:
    raise ValueError(f"unknown {kind} {name!r}; valid names: {', '.join(sorted(table))}")
  return table[key]


def is_traced(value) -> bool:
  """Whether `value` is an abstract value being traced by jit, vmap or grad (it has no concrete value to check)."""
  return isinstance(value, jax.core.Tracer)


def positive(arg: str, value: float) -> float:
  """Returns `value` if value > 0, else raises a ValueError naming `arg` and the value given (NaN fails)."""
  if not is_traced(value) and not value > 0:
    raise ValueError(f"{arg} must be > 0, got {value!r}")
  return value


def non_negative(arg: str, value: float) -> float:
  """Returns `value` if value >= 0, else raises a ValueError naming `arg` and the value given (NaN fails)."""
  if not is_traced(value) and not value >= 0:
    raise ValueError(f"{arg} must be >= 0, got {value!r}")
  return value


def in_range(arg: str, value: float, low: float, high: float, *, low_open: bool = False,
             high_open: bool = False) -> float:
  """Returns `value` if it lies in [low, high] (an end is open instead with `low_open` / `high_open`), else raises
  a ValueError naming `arg`, the interval and the value given."""
  if is_traced(value):
    return value
  ok_low = value > low if low_open else value >= low
  ok_high = value < high if high_open else value <= high
  if not (ok_low and ok_high):
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    raise ValueError(f"{arg} must be in {interval}, got {value!r}")
  return value


def one_of(arg: str, value: str, allowed: tuple[str, ...]) -> str:
  """Returns `value` if it is one of `allowed` (compared exactly, case included), else raises a ValueError naming
  `arg`, the allowed values and the value given."""
  if value not in allowed:
    raise ValueError(f"{arg} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
  return value
