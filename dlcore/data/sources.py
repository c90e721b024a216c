"""Datasets by name as numpy arrays: mnist, fashion_mnist, cifar10 from files or TFDS, and a synthetic toy set.

`load(name)` returns a `Dataset` whose splits hold images as float32 NHWC in [0, 1] (uint8 / 255, decoded once
at load time so every consumer -- preprocessing, batching, plots -- sees one dtype) and labels as int32.
The validation split is the last `validation_size` examples of the original training set; with
validation_size=0 there is none and `Dataset.eval_split` is the test split.

Where the data comes from, first hit wins (`Dataset.source` says which, in words):
  1. `data_dir` (or `data_dir/<name>`) holding the standard files:
       mnist, fashion_mnist: IDX `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`,
         `t10k-labels-idx1-ubyte`, each gzipped (`.gz`) or not;
       cifar10: python batches `cifar-10-batches-py/data_batch_1..5, test_batch` (or those files in data_dir
         itself), the `cifar-10-python.tar.gz` archive, or the binary version (`cifar-10-batches-bin/*.bin`,
         `cifar-10-binary.tar.gz`);
       any of them: image folders `train/<class>/*.png|jpg` and `test/<class>/*` -- e.g. the extracted CIFAR-10
         JPEG q75 proxy, which is lossy and is labelled "CIFAR-10 (JPEG q75 proxy)" in `source`.
  2. With data_dir=None, well-known places: `$DLCORE_DATA_DIR/<name>` and, for fashion_mnist, Debian's
     `/usr/share/datasets/fashion-mnist` (`apt-get install dataset-fashion-mnist`).
  3. TFDS through `tfds.data_source` (random access, no TensorFlow needed; data_dir passed through, so a
     prepared array_record copy under data_dir is found; with tfds_download it may download and prepare).
Files that are present but invalid (bad magic, shape, count, label range, truncated or corrupt gzip/archive)
raise ValueError at once rather than falling through; finding nothing raises FileNotFoundError. Both say
where data was looked for and how to get it.
"""

from collections.abc import Sequence
import dataclasses
import gzip
import io
import math
import os
import pickle
import struct
import tarfile
import zlib

import numpy as np

from dlcore import checks

__all__ = ["IMAGE_EXTENSIONS", "NAMES", "Dataset", "Split", "load", "read_idx", "select_classes", "synthetic"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm")


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """One split: images float32 NHWC in [0, 1], labels int32 of the same length."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def as_dict(self) -> dict[str, np.ndarray]:
    """The arrays under the batch keys: {'image': images, 'label': labels}."""
    return {"image": self.images, "label": self.labels}


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A loaded dataset: train / validation (None when validation_size=0) / test, class count and provenance."""
  name: str
  train: Split
  validation: Split | None
  test: Split
  num_classes: int
  class_names: tuple[str, ...]
  source: str

  @property
  def image_shape(self) -> tuple[int, ...]:
    """(H, W, C) of one image."""
    return tuple(self.train.images.shape[1:])

  @property
  def eval_split_name(self) -> str:
    """'validation' when there is one, else 'test': the split to evaluate on during training."""
    return "validation" if self.validation is not None else "test"

  @property
  def eval_split(self) -> Split:
    """The split called `eval_split_name`: validation when there is one, else test."""
    return self.split(self.eval_split_name)

  def split(self, name: str) -> Split:
    """The split called 'train', 'validation' or 'test' (ValueError otherwise, or if validation is empty)."""
    checks.one_of("split", name, ("train", "validation", "test"))
    split = getattr(self, name)
    if split is None:
      raise ValueError("split 'validation' is empty (validation_size=0); evaluate on 'test'")
    return split


@dataclasses.dataclass(frozen=True)
class _Spec:
  image_shape: tuple[int, int, int]
  class_names: tuple[str, ...]
  tfds_name: str
  default_validation: int
  well_known: tuple[str, ...] = ()
  how_to_get: str = ""

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte")
_FOLDERS_HOW = "or image folders train/<class>/*.png|jpg and test/<class>/*"
_IDX_HOW = ("pass data_dir (binaries: --config.data.data_dir) with the IDX files train-images-idx3-ubyte.gz, "
            "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (gzipped or not) "
            + _FOLDERS_HOW)

_TFDS_HOW = ("or, with internet, let TFDS fetch it: pip install 'dlcore[tfds]' and pass tfds_download=True "
             "(binaries: --config.data.download=True); prepared array_record data for TFDS '{}' is read as it is")

_SPECS = {
    "mnist": _Spec((28, 28, 1), tuple(str(i) for i in range(10)), "mnist", 5000,
                   how_to_get=f"{_IDX_HOW}; {_TFDS_HOW.format('mnist')}"),
    "fashion_mnist": _Spec(
        (28, 28, 1),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        "fashion_mnist", 5000, well_known=("/usr/share/datasets/fashion-mnist",),
        how_to_get=(f"{_IDX_HOW}; or `apt-get install dataset-fashion-mnist` (-> /usr/share/datasets/fashion-mnist);"
                    f" {_TFDS_HOW.format('fashion_mnist')}")),
    "cifar10": _Spec(
        (32, 32, 3),
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        "cifar10", 5000,
        how_to_get=("pass data_dir (binaries: --config.data.data_dir) with cifar-10-batches-py/ (data_batch_1..5, "
                    "test_batch) or cifar-10-python.tar.gz, or cifar-10-batches-bin/ or cifar-10-binary.tar.gz, "
                    f"{_FOLDERS_HOW} (e.g. the extracted CIFAR-10 JPEG q75 proxy, lossy); "
                    + _TFDS_HOW.format("cifar10"))),
}

NAMES = tuple(sorted([*_SPECS, "synthetic"]))


def load(name: str, *, data_dir: str | os.PathLike | None = None, validation_size: int | None = None,
         tfds_download: bool = False, **synthetic_options) -> Dataset:
  """Loads dataset `name` (one of NAMES) as numpy arrays; see the module docstring for the search order.

  validation_size: examples held out from the end of train (None: 5000 for mnist/fashion_mnist/cifar10, a tenth
    of train for synthetic; 0: no validation split).
  tfds_download: let TFDS download and prepare when nothing local is found (needs internet and TensorFlow);
    False (default): only prepared TFDS data, so an offline miss fails at once instead of retrying for minutes.
  synthetic_options: keyword arguments of `synthetic` (only for name='synthetic').
  """
  key = name.lower() if isinstance(name, str) else name
  if key == "synthetic":
    if data_dir is not None:
      raise ValueError(f"data_dir must be None for dataset 'synthetic' (it is generated), got {data_dir!r}")
    return synthetic(validation_size=validation_size, **synthetic_options)
  spec = checks.lookup("dataset", {**_SPECS, "synthetic": None}, key)
  if synthetic_options:
    raise ValueError(f"options {sorted(synthetic_options)} are for dataset 'synthetic' only, not {name!r}")
  validation_size = spec.default_validation if validation_size is None else validation_size
  checks.non_negative("validation_size", validation_size)
  train_x, train_y, test_x, test_y, source = _find(key, spec, data_dir, tfds_download)
  return _assemble(key, train_x, train_y, test_x, test_y, validation_size, spec.num_classes, spec.class_names,
                   source)


def synthetic(*, image_shape: Sequence[int] = (8, 8, 1), num_classes: int = 10, train_size: int = 2000,
              test_size: int = 500, validation_size: int | None = None, noise: float = 0.25,
              seed: int = 0) -> Dataset:
  """A seeded, learnable toy image set: class k is a fixed Gaussian blob image plus pixel noise, clipped to [0, 1].

  Each class gets a spatial Gaussian bump at a random centre with random per-channel brightness (so both MLPs
  and conv nets can learn it); an example is its class's blob + N(0, noise^2) per pixel. Labels are uniform.
  Same arguments -> same arrays. validation_size defaults to train_size // 10.
  """
  image_shape = tuple(int(s) for s in image_shape)
  if len(image_shape) != 3:
    raise ValueError(f"image_shape must be (H, W, C), got {image_shape}")
  for arg, value in [("image_shape[0]", image_shape[0]), ("image_shape[1]", image_shape[1]),
                     ("image_shape[2]", image_shape[2]), ("train_size", train_size), ("test_size", test_size)]:
    checks.positive(arg, value)
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  checks.non_negative("noise", noise)
  checks.non_negative("seed", seed)
  validation_size = train_size // 10 if validation_size is None else validation_size
  checks.non_negative("validation_size", validation_size)
  h, w, c = image_shape
  rng = np.random.default_rng(seed)
  centres = rng.uniform(0, 1, (num_classes, 2)) * [h - 1, w - 1]
  width = max(h, w) / 5
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  bumps = np.exp(-((yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2) / (2 * width ** 2))
  brightness = rng.uniform(0.5, 1.0, (num_classes, 1, 1, c))
  prototypes = 0.1 + 0.8 * bumps[..., None] * brightness  # (K, H, W, C)

  def draw(n):
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    images = prototypes[labels] + noise * rng.standard_normal((n, h, w, c))
    return np.clip(images, 0, 1).astype(np.float32), labels

  train_x, train_y = draw(train_size)
  test_x, test_y = draw(test_size)
  source = (f"synthetic: {num_classes} classes of Gaussian blobs, image_shape {image_shape}, noise {noise}, "
            f"seed {seed}, generated in memory")
  return _assemble("synthetic", train_x, train_y, test_x, test_y, validation_size, num_classes,
                   tuple(f"blob{k}" for k in range(num_classes)), source)


def select_classes(dataset: Dataset, classes: Sequence[int], *, per_class: int = 0, seed: int = 0) -> Dataset:
  """`dataset` restricted to `classes` (original labels), relabelled 0..k-1 in the order given, in every split.

  per_class > 0 keeps that many training examples of each class (a balanced subset drawn without replacement
  with numpy's generator seeded by `seed`, in the original order); a class with fewer is a ValueError. The
  validation and test splits keep every example of the chosen classes.
  """
  classes = tuple(int(c) for c in classes)
  if not classes:
    raise ValueError("classes must name at least one class")
  bad = [c for c in classes if not 0 <= c < dataset.num_classes]
  if bad or len(set(classes)) != len(classes):
    raise ValueError(f"classes must be distinct labels in [0, {dataset.num_classes - 1}] of {dataset.name}, "
                     f"got {classes}")
  checks.non_negative("per_class", per_class)
  relabel = np.full(dataset.num_classes, -1, np.int32)
  relabel[list(classes)] = np.arange(len(classes), dtype=np.int32)

  def keep(split, per_class=0):
    if split is None:
      return None
    index = np.flatnonzero(relabel[split.labels] >= 0)
    if per_class:
      rng = np.random.default_rng(seed)
      chosen = []
      for c in classes:
        members = index[split.labels[index] == c]
        if len(members) < per_class:
          raise ValueError(f"per_class {per_class} is more than the {len(members)} training examples of class "
                           f"{c} ({dataset.class_names[c]})")
        chosen.append(rng.choice(members, per_class, replace=False))
      index = np.sort(np.concatenate(chosen))
    return Split(split.images[index], relabel[split.labels[index]])

  source = (f"{dataset.source}; classes {list(classes)} relabelled 0..{len(classes) - 1}"
            + (f", {per_class} training examples per class (seed {seed})" if per_class else ""))
  return dataclasses.replace(dataset, train=keep(dataset.train, per_class), validation=keep(dataset.validation),
                             test=keep(dataset.test), num_classes=len(classes),
                             class_names=tuple(dataset.class_names[c] for c in classes), source=source)


def _assemble(name, train_x, train_y, test_x, test_y, validation_size, num_classes, class_names, source):
  """Scales uint8 to float32 [0, 1], casts labels to int32 and holds out the validation split from train's end."""
  if validation_size >= len(train_y):
    raise ValueError(f"validation_size must be < the training set size {len(train_y)} of {name}, "
                     f"got {validation_size}")
  to_float = lambda x: np.divide(x, np.float32(255), dtype=np.float32) if x.dtype == np.uint8 else x
  train_x, test_x = to_float(train_x), to_float(test_x)
  train_y, test_y = train_y.astype(np.int32), test_y.astype(np.int32)
  cut = len(train_y) - validation_size
  validation = Split(train_x[cut:], train_y[cut:]) if validation_size else None
  return Dataset(name=name, train=Split(train_x[:cut], train_y[:cut]), validation=validation,
                 test=Split(test_x, test_y), num_classes=num_classes, class_names=tuple(class_names), source=source)


# ---------------------------------------------------------------------------------------------------------------
# Search order.


def _find(name, spec, data_dir, tfds_download):
  """(train_x uint8 NHWC, train_y, test_x, test_y, source) from the first place that has it."""
  if data_dir is not None:
    candidates = [os.fspath(data_dir), os.path.join(os.fspath(data_dir), name)]
  else:
    env = os.environ.get("DLCORE_DATA_DIR")
    candidates = ([os.path.join(env, name)] if env else []) + list(spec.well_known)
  looked = []
  for directory in candidates:
    if not os.path.isdir(directory):
      looked.append(f"{directory} (no such folder)")
      continue
    looked.append(directory)
    found = _from_directory(name, spec, directory)
    if found is not None:
      return found
  try:
    return _from_tfds(name, spec, data_dir, tfds_download)
  except _TfdsUnavailable as e:
    where = ", ".join(looked) if looked else "(no data_dir given, and no well-known folder for this dataset)"
    raise FileNotFoundError(
        f"could not find dataset {name!r}. Looked in: {where}; then TFDS "
        f"(data_dir={data_dir or 'default'}): {e}. To get it: {spec.how_to_get}.") from e


def _from_directory(name, spec, directory):
  """The dataset from the standard files in `directory`, or None when none of them is there."""
  readers = [_cifar_python, _cifar_binary] if name == "cifar10" else [_idx_files]
  for reader in readers + [_image_folders]:
    found = reader(name, spec, directory)
    if found is not None:
      return found
  return None


def _bad(path, problem, spec):
  return ValueError(f"{path}: {problem}. Fix or replace the file ({spec.how_to_get}).")


def _check_labels(labels, num_classes, path, spec):
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise _bad(path, f"labels must be 1-d, got shape {labels.shape}", spec)
  bad = (labels < 0) | (labels >= num_classes)
  if bad.any():
    raise _bad(path, f"{int(bad.sum())} labels outside [0, {num_classes}) (e.g. {int(labels[bad][0])})", spec)
  return labels.astype(np.int32)


def _check_pair(images, labels, path, spec):
  if len(images) != len(labels):
    raise _bad(path, f"{len(images)} images but {len(labels)} labels", spec)
  if tuple(images.shape[1:]) != spec.image_shape:
    raise _bad(path, f"images have shape {tuple(images.shape[1:])}, expected {spec.image_shape}", spec)


# ---------------------------------------------------------------------------------------------------------------
# MNIST-style IDX files.

_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_bytes(path, spec) -> bytes:
  """The file's bytes, gunzipped when it starts with the gzip magic (whatever its name)."""
  with open(path, "rb") as f:
    raw = f.read()
  if raw[:2] != b"\x1f\x8b":
    return raw
  try:
    return gzip.decompress(raw)
  except (EOFError, OSError, zlib.error) as e:
    raise _bad(path, f"truncated or corrupt gzip ({type(e).__name__}: {e})", spec) from e


def read_idx(path: str | os.PathLike, *, spec: _Spec | None = None) -> np.ndarray:
  """Reads one IDX file (gzipped or not) into an array of its declared dtype and shape, validating the header."""
  spec = spec or _SPECS["mnist"]
  raw = _read_bytes(path, spec)
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
    raise _bad(path, f"not an IDX file: magic bytes {raw[:4].hex()!r}, expected 0000 08 01 (labels) or "
                     "0000 08 03 (images)", spec)
  ndim = raw[3]
  if len(raw) < 4 + 4 * ndim:
    raise _bad(path, f"IDX header truncated ({len(raw)} bytes)", spec)
  dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
  dtype = _IDX_DTYPES[raw[2]]
  body = memoryview(raw)[4 + 4 * ndim:]
  expected = math.prod(dims) * dtype.itemsize
  if len(body) != expected:
    raise _bad(path, f"IDX body has {len(body)} bytes, header {dims} needs {expected} (truncated file?)", spec)
  return np.frombuffer(body, dtype).reshape(dims)


def _find_file(directory, stem):
  for candidate in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
    path = os.path.join(directory, candidate)
    if os.path.isfile(path):
      return path
  return None


def _idx_files(name, spec, directory):
  paths = {stem: _find_file(directory, stem) for stem in _IDX_FILES}
  if not any(paths.values()):
    return None
  missing = [stem for stem, path in paths.items() if path is None]
  if missing:
    raise FileNotFoundError(f"{directory} holds some IDX files of {name} but not {', '.join(missing)} (.gz or not). "
                            f"To get it: {spec.how_to_get}.")
  arrays = []
  for stem, expected_ndim in zip(_IDX_FILES, (3, 1, 3, 1)):
    array = read_idx(paths[stem], spec=spec)
    if array.dtype != np.uint8 or array.ndim != expected_ndim:
      kind = "images (magic 0x00000803: uint8, 3-d)" if expected_ndim == 3 else "labels (magic 0x00000801: uint8, 1-d)"
      raise _bad(paths[stem], f"expected {kind}, got {array.dtype} with shape {array.shape}", spec)
    arrays.append(array)
  train_x, train_y, test_x, test_y = arrays
  train_x, test_x = train_x[..., None], test_x[..., None]
  _check_pair(train_x, train_y, paths[_IDX_FILES[0]], spec)
  _check_pair(test_x, test_y, paths[_IDX_FILES[2]], spec)
  train_y = _check_labels(train_y, spec.num_classes, paths[_IDX_FILES[1]], spec)
  test_y = _check_labels(test_y, spec.num_classes, paths[_IDX_FILES[3]], spec)
  return train_x, train_y, test_x, test_y, f"{name} from IDX files in {directory}"


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10 python and binary versions.

_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles CIFAR batches (dicts, lists, bytes, numpy arrays) and refuses any other class."""
  _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
              ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
              ("numpy._core.numeric", "_frombuffer"), ("copyreg", "_reconstructor"),
              ("_codecs", "encode")}  # Python 3 protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1').

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a CIFAR batch")
    return super().find_class(module, name)


def _cifar_batch(data: bytes, path, spec):
  try:
    batch = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
  except Exception as e:  # pickle raises many types on garbage input.
    raise _bad(path, f"not a CIFAR-10 python batch ({type(e).__name__}: {e})", spec) from e
  if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
    keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
    raise _bad(path, f"expected a dict with b'data' and b'labels', got {keys}", spec)
  images = np.asarray(batch[b"data"])
  labels = np.asarray(batch[b"labels"])
  if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072:
    raise _bad(path, f"b'data' must be uint8 of shape (N, 3072), got {images.dtype} {images.shape}", spec)
  images = images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # rows are channel-major R, G, B planes.
  _check_pair(images, labels, path, spec)
  return images, _check_labels(labels, spec.num_classes, path, spec)


def _cifar_records(data: bytes, path, spec):
  """The binary version: records of 1 label byte + 3072 channel-major pixel bytes."""
  if len(data) % 3073:
    raise _bad(path, f"{len(data)} bytes is not a whole number of 3073-byte CIFAR-10 records", spec)
  records = np.frombuffer(data, np.uint8).reshape(-1, 3073)
  images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images, _check_labels(records[:, 0], spec.num_classes, path, spec)


def _cifar_from(files, parse, name, spec, where):
  """Concatenates the parsed train files and the test file: `files` maps member name -> (bytes, path)."""
  parts = [parse(*files[member], spec) for member in list(files)]
  train_x = np.concatenate([p[0] for p in parts[:-1]])
  train_y = np.concatenate([p[1] for p in parts[:-1]])
  test_x, test_y = parts[-1]
  return np.ascontiguousarray(train_x), train_y, np.ascontiguousarray(test_x), test_y, where


def _cifar_folder_or_archive(name, spec, directory, folder, archive, members, parse, kind):
  for d in (os.path.join(directory, folder), directory):
    paths = {m: os.path.join(d, m) for m in members}
    present = [m for m, p in paths.items() if os.path.isfile(p)]
    if present and len(present) < len(members):
      missing = [m for m in members if m not in present]
      raise FileNotFoundError(f"{d} holds some CIFAR-10 {kind} batches but not {', '.join(missing)}. "
                              f"To get it: {spec.how_to_get}.")
    if present:
      files = {}
      for m, p in paths.items():
        with open(p, "rb") as f:
          files[m] = (f.read(), p)
      return _cifar_from(files, parse, name, spec, f"cifar10 from {kind} batches in {d}")
  path = os.path.join(directory, archive)
  if not os.path.isfile(path):
    return None
  try:
    with tarfile.open(path, "r:gz") as tar:
      by_name = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
      missing = [m for m in members if m not in by_name]
      if missing:
        raise _bad(path, f"archive lacks {', '.join(missing)}", spec)
      files = {m: (tar.extractfile(by_name[m]).read(), f"{path}:{by_name[m].name}") for m in members}
  except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
    raise _bad(path, f"truncated or corrupt archive ({type(e).__name__}: {e})", spec) from e
  return _cifar_from(files, parse, name, spec, f"cifar10 from {kind} archive {path}")


def _cifar_python(name, spec, directory):
  return _cifar_folder_or_archive(name, spec, directory, "cifar-10-batches-py", "cifar-10-python.tar.gz",
                                  _CIFAR_TRAIN + ("test_batch",), _cifar_batch, "python")


def _cifar_binary(name, spec, directory):
  members = tuple(f"{m}.bin" for m in _CIFAR_TRAIN) + ("test_batch.bin",)
  return _cifar_folder_or_archive(name, spec, directory, "cifar-10-batches-bin", "cifar-10-binary.tar.gz",
                                  members, _cifar_records, "binary")


# ---------------------------------------------------------------------------------------------------------------
# Image folders: train/<class>/*, test/<class>/*.


def _normalise(class_name: str) -> str:
  return "".join(ch for ch in class_name.lower() if ch.isalnum())


def _jpeg_quality(path) -> int | None:
  """The IJG quality whose standard luminance table the JPEG at `path` uses (None if it matches none)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  base = [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
          14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
          49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99]
  with Image.open(path) as im:
    table = sorted(getattr(im, "quantization", {}).get(0, []))
  for quality in range(1, 101):
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    if table == sorted(min(max((b * scale + 50) // 100, 1), 255) for b in base):
      return quality
  return None


def _list_folder(root, spec, name):
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  known = {_normalise(c): i for i, c in enumerate(spec.class_names)}
  files, labels = [], []
  for cls in classes:
    if _normalise(cls) in known:
      label = known[_normalise(cls)]
    elif cls.isdigit() and int(cls) < spec.num_classes:
      label = int(cls)
    else:
      raise _bad(os.path.join(root, cls), f"unknown class folder {cls!r} for {name}; valid names: "
                 f"{', '.join(spec.class_names)} (or 0..{spec.num_classes - 1})", spec)
    names = sorted(f for f in os.listdir(os.path.join(root, cls)) if f.lower().endswith(IMAGE_EXTENSIONS))
    files += [os.path.join(root, cls, f) for f in names]
    labels += [label] * len(names)
  if not files:
    raise _bad(root, f"no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders {classes}", spec)
  return files, np.asarray(labels, np.int32)


def _decode_images(files, spec):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w, c = spec.image_shape
  mode = "L" if c == 1 else "RGB"
  out = np.empty((len(files), h, w, c), np.uint8)
  for i, path in enumerate(files):
    ext = os.path.splitext(path)[1].lower()
    # Naming the format skips Pillow's try-every-plugin probe, which costs more than decoding a 32x32 JPEG.
    formats = {".jpg": ["JPEG"], ".jpeg": ["JPEG"], ".png": ["PNG"]}.get(ext)
    try:
      with open(path, "rb") as f, Image.open(io.BytesIO(f.read()), formats=formats) as im:
        array = np.asarray(im if im.mode == mode else im.convert(mode))
    except (OSError, ValueError, SyntaxError) as e:
      raise _bad(path, f"cannot decode image ({type(e).__name__}: {e})", spec) from e
    if array.shape[:2] != (h, w):
      raise _bad(path, f"image is {array.shape[1]}x{array.shape[0]}, expected {w}x{h}", spec)
    out[i] = array.reshape(h, w, c)
  return out


def _image_folders(name, spec, directory):
  train_dir, test_dir = os.path.join(directory, "train"), os.path.join(directory, "test")
  if not (os.path.isdir(train_dir) or os.path.isdir(test_dir)):
    return None
  if not (os.path.isdir(train_dir) and os.path.isdir(test_dir)):
    raise FileNotFoundError(f"{directory} has only one of train/ and test/ image folders; both are needed. "
                            f"To get it: {spec.how_to_get}.")
  train_files, train_y = _list_folder(train_dir, spec, name)
  test_files, test_y = _list_folder(test_dir, spec, name)
  # Files are listed class by class; a fixed permutation mixes the classes before validation is cut from the end.
  order = np.random.default_rng(0).permutation(len(train_files))
  train_files, train_y = [train_files[i] for i in order], train_y[order]
  train_x, test_x = _decode_images(train_files, spec), _decode_images(test_files, spec)
  jpeg = train_files[0].lower().endswith((".jpg", ".jpeg"))
  if jpeg:
    quality = _jpeg_quality(train_files[0])
    label = f"JPEG q{quality}" if quality else "JPEG"
    title = f"CIFAR-10 ({label} proxy)" if name == "cifar10" else f"{name} ({label})"
    source = f"{title} from image folders train/<class>, test/<class> in {directory}; lossy, not bit-exact"
  else:
    source = f"{name} from image folders train/<class>, test/<class> in {directory}"
  return train_x, train_y, test_x, test_y, source


# ---------------------------------------------------------------------------------------------------------------
# TFDS.


class _TfdsUnavailable(Exception):
  """TFDS could not provide the data; the message says why."""


def _from_tfds(name, spec, data_dir, download):
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise _TfdsUnavailable(f"tensorflow_datasets is not installed ({e})") from e
  data_dir = os.fspath(data_dir) if data_dir is not None else None
  try:
    # array_record: the random-access format data_source reads (TFDS prepares TFRecord when given a data_dir)
    sources = {split: tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir, download=download,
                                       builder_kwargs={"file_format": "array_record"})
               for split in ("train", "test")}
    arrays = {}
    for split, source in sources.items():
      examples = [source[i] for i in range(len(source))]
      if not examples:
        raise ValueError(f"TFDS split {split!r} of {spec.tfds_name} is empty")
      arrays[split] = (np.stack([np.asarray(e["image"], np.uint8) for e in examples]),
                       np.asarray([e["label"] for e in examples]))
  except Exception as e:  # TFDS raises many types (not found, no network, wrong file format); all mean 'not here'.
    first_line = str(e).strip().splitlines()[0].rstrip(" :") if str(e).strip() else ""
    raise _TfdsUnavailable(f"{type(e).__name__}: {first_line}") from e
  where = f"TFDS {spec.tfds_name!r} via tfds.data_source (data_dir={data_dir or 'default'})"
  out = []
  for split in ("train", "test"):
    images, labels = arrays[split]
    _check_pair(images, labels, where, spec)
    out += [images, _check_labels(labels, spec.num_classes, where, spec)]
  return (*out, f"{name} from {where}")
