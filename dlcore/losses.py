"""Data losses by name (softmax cross-entropy, multiclass hinge, MSE), weight penalties, accuracy.

Every data loss maps `(logits, labels)` to the mean over the batch (over every leading axis) of a per-example loss.
`labels` are integer class indices in [0, num_classes), shaped `logits.shape[:-1]`; a label outside that range makes
its example's loss NaN rather than silently reading another class (labels may be traced, so this is not raised).
Losses are computed in at least float32, so bfloat16 logits do not lose the log-sum-exp.

Penalties act on weights only -- the kernels picked by `dlcore.masks.weights` -- never on biases or BatchNorm
scale/offset (see `dlcore.masks` for why).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dlcore import checks, masks

__all__ = ["LOSSES", "PENALTIES", "Loss", "accuracy", "cross_entropy", "elastic_net", "get", "hinge", "l1", "l2", "mse",
           "penalty"]

Loss = Callable[..., jax.Array]


def _check_labels(logits: jax.Array, labels: jax.Array, allowed: str = "integer class indices, not one-hot") -> None:
  """Integer labels shaped like logits without the class axis; ValueError naming both shapes otherwise."""
  if logits.ndim < 1:
    raise ValueError(f"logits must have a class axis, got shape {logits.shape}")
  if labels.shape != logits.shape[:-1]:
    raise ValueError(f"labels shape {labels.shape} must equal logits shape without the class axis "
                     f"{logits.shape[:-1]} ({allowed})")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")


def _as_float(logits: jax.Array) -> jax.Array:
  return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def _nan_if_invalid(per_example: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  valid = (labels >= 0) & (labels < num_classes)
  return jnp.where(valid, per_example, jnp.nan)


def _label_logit(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """logits[..., labels], i.e. s_y, for each example."""
  safe = jnp.clip(labels, 0, logits.shape[-1] - 1)
  return jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]


def cross_entropy(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0) -> jax.Array:
  """Softmax cross-entropy -sum_j t_j log softmax(s)_j, with t = (1 - ls) one_hot(y) + ls / K.

  Uses log-softmax (max-shifted log-sum-exp), so logits of any magnitude give finite losses and gradients.
  label_smoothing (ls, a Python float in [0, 1)) spreads ls of the target mass uniformly over the K classes.
  """
  checks.in_range("label_smoothing", label_smoothing, 0.0, 1.0, high_open=True)
  logits, labels = _as_float(jnp.asarray(logits)), jnp.asarray(labels)
  _check_labels(logits, labels)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  per_example = -_label_logit(log_p, labels)
  if checks.is_traced(label_smoothing) or label_smoothing:  # traced: per member, 0 gives the plain loss
    per_example = (1.0 - label_smoothing) * per_example - label_smoothing * jnp.mean(log_p, axis=-1)
  return jnp.mean(_nan_if_invalid(per_example, labels, logits.shape[-1]))


def hinge(logits: jax.Array, labels: jax.Array, *, delta: float = 1.0) -> jax.Array:
  """Multiclass SVM hinge (Weston & Watkins 1999): sum_{j != y} max(0, s_j - s_y + delta).

  delta (>= 0) is the margin by which the correct score must beat every other score to cost nothing. At an
  exact tie (s_j - s_y + delta == 0) the subgradient is 0, as in cs231n and PyTorch's multi_margin_loss.
  """
  checks.non_negative("delta", delta)
  logits, labels = _as_float(jnp.asarray(logits)), jnp.asarray(labels)
  _check_labels(logits, labels)
  num_classes = logits.shape[-1]
  margins = jax.nn.relu(logits - _label_logit(logits, labels)[..., None] + delta)  # relu'(0) = 0
  is_label = labels[..., None] == jnp.arange(num_classes)
  per_example = jnp.sum(jnp.where(is_label, 0.0, margins), axis=-1)
  return jnp.mean(_nan_if_invalid(per_example, labels, num_classes))


def mse(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean squared error mean_j (s_j - t_j)^2 per example, t = one_hot(labels), averaged over the batch.

  That is the mean over every element (batch and classes); it is 1/K of the summed squared error. `labels` may
  instead be real-valued targets shaped like `logits` (regression), used as they are.
  """
  logits, labels = _as_float(jnp.asarray(logits)), jnp.asarray(labels)
  if labels.shape == logits.shape and jnp.issubdtype(labels.dtype, jnp.floating):
    return jnp.mean(jnp.square(logits - labels))
  _check_labels(logits, labels, "integer class indices, or real-valued targets shaped like logits")
  num_classes = logits.shape[-1]
  targets = (labels[..., None] == jnp.arange(num_classes)).astype(logits.dtype)
  per_example = jnp.mean(jnp.square(logits - targets), axis=-1)
  return jnp.mean(_nan_if_invalid(per_example, labels, num_classes))


_LOSSES: dict[str, Loss] = {
    "cross_entropy": cross_entropy,
    "softmax": cross_entropy,
    "hinge": hinge,
    "svm": hinge,
    "mse": mse,
}

LOSSES = ("cross_entropy", "hinge", "mse")  # canonical names; get() also takes the aliases 'softmax', 'svm'


def get(name: str) -> Loss:
  """Returns the loss `fn(logits, labels, **kw)` called `name` (ValueError listing the valid names otherwise)."""
  return checks.lookup("loss", _LOSSES, name)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of examples whose highest logit is the label (ties go to the lowest index, as argmax)."""
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  _check_labels(logits, labels)
  return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


# Penalties. L2 is 0.5 * sum w^2 so its gradient is strength * w: the same coefficient as weight decay with SGD.

def l1(params) -> jax.Array:
  """sum |w| over every weight (kernel) of `params`."""
  return sum((jnp.sum(jnp.abs(w)) for w in masks.weights(params)), jnp.zeros(()))


def l2(params) -> jax.Array:
  """0.5 * sum w^2 over every weight (kernel) of `params` (the 1/2 makes the gradient w)."""
  return sum((0.5 * jnp.sum(jnp.square(w)) for w in masks.weights(params)), jnp.zeros(()))


def elastic_net(params, l1_ratio: float = 0.5) -> jax.Array:
  """l1_ratio * l1(params) + (1 - l1_ratio) * l2(params): l1_ratio=1 is L1, 0 is L2 (scikit-learn's mixing)."""
  checks.in_range("l1_ratio", l1_ratio, 0.0, 1.0)
  return l1_ratio * l1(params) + (1.0 - l1_ratio) * l2(params)


_PENALTIES: dict[str, Callable[..., jax.Array]] = {
    "none": lambda params, l1_ratio: jnp.zeros(()),
    "l1": lambda params, l1_ratio: l1(params),
    "l2": lambda params, l1_ratio: l2(params),
    "elastic_net": elastic_net,
}

PENALTIES = ("none", "l1", "l2", "elastic_net")


def penalty(name: str, params, strength: float, l1_ratio: float = 0.5) -> jax.Array:
  """strength * R(weights of params), R the penalty called `name` (one of PENALTIES); a scalar.

  l1_ratio (in [0, 1]) matters only for 'elastic_net'. `params` may be a whole variables dict: only leaves named
  'kernel' count, so biases, BatchNorm scale/offset and batch_stats never do.
  """
  fn = checks.lookup("penalty", _PENALTIES, name)
  checks.non_negative("strength", strength)
  checks.in_range("l1_ratio", l1_ratio, 0.0, 1.0)
  return strength * fn(params, l1_ratio)
