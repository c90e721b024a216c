"""Input preprocessing fitted on the training split only and applied unchanged to every split (numpy, float64 inside).

Methods, by name (x is one image flattened to D = H*W*C values, statistics over the N training images):
  none          x
  mean_image    x - mean image
  channel_mean  x - per-channel mean (over N, H, W)
  standardize   (x - mean) / sqrt(var + eps), per dimension
  pca_whiten    Xrot = (x - mean) U;  Xwhite = Xrot / sqrt(S + eps)
  zca_whiten    Xwhite U^T
where U, S are the eigenvectors / eigenvalues (descending) of the training covariance (X - mean)^T (X - mean) / N
(the lectures' np.linalg.svd(cov); eigh is the same for a symmetric PSD matrix). eps is in units of variance
(pixels in [0, 1]). Its default, 1e-2, bounds the gain on near-constant pixels and low-variance directions: with
the lectures' 1e-5, test pixels that are almost always 0 in train (Fashion-MNIST's border) are blown up by orders
of magnitude after standardize or ZCA, at the price of a whitened std below 1. Pass epsilon=1e-5 to reproduce
the lectures' pictures. PCA-whitened rows hold component k at flat position k, reshaped back to the input's
(H, W, C) only to keep shapes static: they have no image structure left.

Two interfaces: `fit(method, train_images) -> Preprocessor` (a frozen object with `.params`, callable on any
split), or the pair `fit_params(method, train_images) -> params` and `apply(method, params, images)`.
`preprocess_dataset` fits on `dataset.train` and returns the dataset with every split transformed.
Outputs are float32 of the input's shape.
"""

import dataclasses

import numpy as np

from dlcore import checks

__all__ = ["DEFAULT_EPSILON", "METHODS", "Preprocessor", "apply", "fit", "fit_params", "preprocess_dataset"]

METHODS = ("channel_mean", "mean_image", "none", "pca_whiten", "standardize", "zca_whiten")
DEFAULT_EPSILON = 1e-2
_CHUNK = 4096  # rows per float64 block, so float64 copies of a whole split are never materialised.


def _blocks(x: np.ndarray):
  for start in range(0, len(x), _CHUNK):
    yield start, x[start:start + _CHUNK].reshape(min(_CHUNK, len(x) - start), -1).astype(np.float64)


def _mean(x: np.ndarray) -> np.ndarray:
  """Mean of the flattened rows, accumulated in float64."""
  total = np.zeros(int(np.prod(x.shape[1:])), np.float64)
  for _, block in _blocks(x):
    total += block.sum(axis=0)
  return total / len(x)


def _covariance(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
  cov = np.zeros((mean.size, mean.size), np.float64)
  for _, block in _blocks(x):
    block -= mean
    cov += block.T @ block
  return cov / len(x)


def fit_params(method: str, train_images: np.ndarray, *, epsilon: float | None = None) -> dict[str, np.ndarray]:
  """The statistics `method` needs, from the training images (N, ...) only; float64 arrays."""
  checks.lookup("preprocessing method", {m: m for m in METHODS}, method)
  method = method.lower()
  epsilon = DEFAULT_EPSILON if epsilon is None else epsilon
  checks.non_negative("epsilon", epsilon)
  x = np.asarray(train_images)
  if x.ndim < 2 or len(x) == 0:
    raise ValueError(f"train_images must have shape (N, ...) with N > 0, got {x.shape}")
  shape = x.shape[1:]
  if method == "none":
    return {}
  mean = _mean(x)
  if method == "mean_image":
    return {"mean": mean.reshape(shape)}
  if method == "channel_mean":
    return {"mean": mean.reshape(-1, shape[-1]).mean(axis=0)}  # equal-size pixels: mean of means is exact.
  if method == "standardize":
    var = np.zeros_like(mean)
    for _, block in _blocks(x):
      var += ((block - mean) ** 2).sum(axis=0)
    return {"mean": mean.reshape(shape), "std": np.sqrt(var / len(x) + epsilon).reshape(shape)}
  eigenvalues, eigenvectors = np.linalg.eigh(_covariance(x, mean))
  eigenvalues, eigenvectors = np.clip(eigenvalues[::-1], 0, None), eigenvectors[:, ::-1]
  matrix = eigenvectors / np.sqrt(eigenvalues + epsilon)  # U diag(1 / sqrt(S + eps)): PCA whitening.
  if method == "zca_whiten":
    matrix = matrix @ eigenvectors.T
  return {"mean": mean, "eigenvalues": eigenvalues, "eigenvectors": eigenvectors, "matrix": matrix}


def apply(method: str, params: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
  """Transforms `images` (N, ...) with statistics from `fit_params`; float32 of the same shape."""
  checks.lookup("preprocessing method", {m: m for m in METHODS}, method)
  method = method.lower()
  x = np.asarray(images)
  if method == "none":
    return x.astype(np.float32)
  fitted = params["mean"].shape
  if method == "channel_mean":
    if x.shape[-1:] != fitted:
      raise ValueError(f"images have {x.shape[-1]} channels, the preprocessing was fitted on {fitted[0]}")
    return (x.astype(np.float64) - params["mean"]).astype(np.float32)
  size = int(np.prod(x.shape[1:]))
  if (method in ("mean_image", "standardize") and x.shape[1:] != fitted) or size != int(np.prod(fitted)):
    raise ValueError(f"images have shape {x.shape[1:]}, the preprocessing was fitted on shape {fitted}")
  out = np.empty(x.shape, np.float32)
  flat_out = out.reshape(len(x), -1)
  for start, block in _blocks(x):
    if method == "mean_image":
      block -= params["mean"].reshape(-1)
    elif method == "standardize":
      block = (block - params["mean"].reshape(-1)) / params["std"].reshape(-1)
    else:
      block = (block - params["mean"]) @ params["matrix"]
    flat_out[start:start + len(block)] = block
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class Preprocessor:
  """A preprocessing method (one of METHODS) with its fitted statistics `params` and `epsilon`; calling it on
  images (N, ...) of any split returns float32 of the same shape."""
  method: str
  params: dict[str, np.ndarray]
  epsilon: float

  def __call__(self, images: np.ndarray) -> np.ndarray:
    return apply(self.method, self.params, images)


def fit(method: str, train_images: np.ndarray, *, epsilon: float | None = None) -> Preprocessor:
  """Fits `method` on the training images; the result transforms any split with those statistics."""
  epsilon = DEFAULT_EPSILON if epsilon is None else epsilon
  return Preprocessor(method.lower(), fit_params(method, train_images, epsilon=epsilon), epsilon)


def preprocess_dataset(dataset, method: str, *, epsilon: float | None = None):
  """(dataset with every split transformed, Preprocessor) -- fitted on dataset.train only."""
  from dlcore.data.sources import Split  # pylint: disable=g-import-not-at-top

  transform = fit(method, dataset.train.images, epsilon=epsilon)
  if transform.method == "none":
    return dataset, transform
  redo = lambda s: None if s is None else Split(transform(s.images), s.labels)
  return dataclasses.replace(dataset, train=redo(dataset.train), validation=redo(dataset.validation),
                             test=redo(dataset.test)), transform
