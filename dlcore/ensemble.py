"""Ensembles by averaging predicted class probabilities (of seeds, checkpoints or SGDR snapshots)."""

from collections.abc import Mapping

import numpy as np


def average(member_probs: Mapping[str, np.ndarray]) -> np.ndarray:
  """Mean of the members' [N, classes] probability arrays."""
  if not member_probs:
    raise ValueError("an ensemble needs at least one member, got none")
  shapes = {name: p.shape for name, p in member_probs.items()}
  if len(set(shapes.values())) != 1:
    raise ValueError(f"ensemble members must predict the same examples and classes, got shapes {shapes}")
  return np.mean(np.stack(list(member_probs.values())), axis=0)


def scores(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """Accuracy and mean negative log-likelihood of probabilities against integer labels."""
  picked = probs[np.arange(len(labels)), labels]
  return {"accuracy": float(np.mean(np.argmax(probs, -1) == labels)),
          "loss": float(-np.mean(np.log(np.clip(picked, 1e-12, None))))}


def report(member_probs: Mapping[str, np.ndarray], labels: np.ndarray) -> dict:
  """{'members': {name: scores}, 'ensemble': scores of the averaged probabilities}."""
  return {"members": {name: scores(p, labels) for name, p in member_probs.items()},
          "ensemble": scores(average(member_probs), labels)}
