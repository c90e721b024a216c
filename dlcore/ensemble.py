"""Ensembles by averaging predicted class probabilities (of seeds, checkpoints or SGDR snapshots)."""

from collections.abc import Mapping

import numpy as np

__all__ = ["average", "report", "scores"]


def average(member_probs: Mapping[str, np.ndarray]) -> np.ndarray:
  """Mean of the members' probability arrays ({name: [N, classes]}), as [N, classes]; ValueError when there are
  no members or their shapes differ."""
  if not member_probs:
    raise ValueError("an ensemble needs at least one member, got none")
  shapes = {name: p.shape for name, p in member_probs.items()}
  if len(set(shapes.values())) != 1:
    raise ValueError(f"ensemble members must predict the same examples and classes, got shapes {shapes}")
  return np.mean(np.stack(list(member_probs.values())), axis=0)


def scores(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """{'accuracy', 'loss'} of probabilities [N, classes] against integer labels [N], as floats: the fraction whose
  argmax is the label and the mean negative log of the label's probability (clipped below at 1e-12)."""
  picked = probs[np.arange(len(labels)), labels]
  return {"accuracy": float(np.mean(np.argmax(probs, -1) == labels)),
          "loss": float(-np.mean(np.log(np.clip(picked, 1e-12, None))))}


def report(member_probs: Mapping[str, np.ndarray], labels: np.ndarray) -> dict:
  """{'members': {name: scores}, 'ensemble': scores of the averaged probabilities}."""
  return {"members": {name: scores(p, labels) for name, p in member_probs.items()},
          "ensemble": scores(average(member_probs), labels)}
