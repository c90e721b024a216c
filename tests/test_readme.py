"""The README's "Use dlcore in your own code" examples run as written (each asserts that its loss falls)."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def _blocks() -> list[str]:
  with open(README) as f:
    text = f.read()
  section = text[text.index("## Use dlcore in your own code"):]
  section = section[:section.index("\n## ", 1)]
  return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_has_the_three_examples():
  blocks = _blocks()
  assert len(blocks) == 3
  assert "layers.Dense" in blocks[0] and "optax.chain" in blocks[0]
  assert "nnx.bridge.ToNNX" in blocks[1] and "nnx.Optimizer" in blocks[1]
  assert "population.create" in blocks[2] and "DeviceBatches" in blocks[2]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_readme_example_runs(index):
  exec(compile(_blocks()[index], f"README.md example {index + 1}", "exec"), {"__name__": "readme_example"})
