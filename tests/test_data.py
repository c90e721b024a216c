"""Dataset loading (IDX, CIFAR python/binary, image folders, TFDS mock, synthetic) and batching."""

import gzip
import io
import os
import pickle
import struct
import tarfile

import numpy as np
from PIL import Image
import pytest

from dlcore import data
from dlcore.data import pipeline, sources

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------------------------------------
# File writers in the real formats.


def write_idx(path, array, *, gz=True, magic=None):
  array = np.asarray(array, np.uint8)
  header = struct.pack(">I", magic if magic is not None else 0x0800 + array.ndim)
  header += struct.pack(f">{array.ndim}I", *array.shape)
  raw = header + array.tobytes()
  with open(path, "wb") as f:
    f.write(gzip.compress(raw) if gz else raw)
  return path


def make_idx_dir(directory, *, n_train=30, n_test=10, gz=True, size=28):
  os.makedirs(directory, exist_ok=True)
  arrays = {
      "train-images-idx3-ubyte": RNG.integers(0, 256, (n_train, size, size)),
      "train-labels-idx1-ubyte": np.arange(n_train) % 10,
      "t10k-images-idx3-ubyte": RNG.integers(0, 256, (n_test, size, size)),
      "t10k-labels-idx1-ubyte": (np.arange(n_test) * 3) % 10,
  }
  for stem, array in arrays.items():
    write_idx(os.path.join(directory, stem + (".gz" if gz else "")), array, gz=gz)
  return arrays


def cifar_rows(images):
  """NHWC uint8 -> CIFAR rows: 3072 bytes, the 1024 R values, then G, then B, each row-major."""
  return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)


def cifar_pickle(images, labels):
  batch = {b"batch_label": b"testing", b"labels": [int(v) for v in labels], b"data": cifar_rows(images),
           b"filenames": [b"x.png"] * len(labels)}
  # Protocol 2 with numpy's pre-2.0 module path, as in the real (Python 2) files.
  return pickle.dumps(batch, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def make_cifar(n_per_batch=4, n_test=6):
  train = [(RNG.integers(0, 256, (n_per_batch, 32, 32, 3), dtype=np.uint8), RNG.integers(0, 10, n_per_batch))
           for _ in range(5)]
  test = (RNG.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8), RNG.integers(0, 10, n_test))
  return train, test


def write_cifar_python(directory, train, test, *, archive=False):
  files = {f"data_batch_{i + 1}": cifar_pickle(*b) for i, b in enumerate(train)}
  files["test_batch"] = cifar_pickle(*test)
  if not archive:
    folder = os.path.join(directory, "cifar-10-batches-py")
    os.makedirs(folder)
    for name, raw in files.items():
      with open(os.path.join(folder, name), "wb") as f:
        f.write(raw)
    return folder
  path = os.path.join(directory, "cifar-10-python.tar.gz")
  with tarfile.open(path, "w:gz") as tar:
    for name, raw in files.items():
      info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
      info.size = len(raw)
      tar.addfile(info, io.BytesIO(raw))
  return path


# ---------------------------------------------------------------------------------------------------------------
# IDX.


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_load_with_shapes_labels_and_scaling(tmp_path, gz):
  arrays = make_idx_dir(tmp_path, gz=gz)
  ds = data.load("mnist", data_dir=tmp_path, validation_size=5)
  assert ds.train.images.shape == (25, 28, 28, 1) and ds.validation.images.shape == (5, 28, 28, 1)
  assert ds.test.images.shape == (10, 28, 28, 1)
  assert ds.train.images.dtype == np.float32 and ds.train.labels.dtype == np.int32
  expected = arrays["train-images-idx3-ubyte"][:25].astype(np.uint8) / np.float32(255)
  np.testing.assert_array_equal(ds.train.images[..., 0], expected)
  np.testing.assert_array_equal(ds.validation.labels, arrays["train-labels-idx1-ubyte"][25:])
  np.testing.assert_array_equal(ds.test.labels, arrays["t10k-labels-idx1-ubyte"])
  assert ds.num_classes == 10 and ds.eval_split_name == "validation"
  assert ds.source == f"mnist from IDX files in {tmp_path}"


def test_validation_size_zero_evaluates_on_test(tmp_path):
  make_idx_dir(tmp_path / "fashion_mnist")  # data_dir/<name> is searched too.
  ds = data.load("fashion_mnist", data_dir=tmp_path, validation_size=0)
  assert ds.validation is None and len(ds.train) == 30
  assert ds.eval_split_name == "test" and ds.eval_split is ds.test
  assert ds.class_names[0] == "T-shirt/top"
  with pytest.raises(ValueError, match="validation_size=0"):
    ds.split("validation")
  with pytest.raises(ValueError, match="validation_size must be < the training set size 30"):
    data.load("fashion_mnist", data_dir=tmp_path, validation_size=30)


def test_well_known_place_from_environment(tmp_path, monkeypatch):
  make_idx_dir(tmp_path / "fashion_mnist")
  monkeypatch.setenv("DLCORE_DATA_DIR", str(tmp_path))
  ds = data.load("fashion_mnist", validation_size=3)
  assert str(tmp_path / "fashion_mnist") in ds.source and len(ds.validation) == 3


def _corrupt(tmp_path, stem, content):
  make_idx_dir(tmp_path)
  with open(tmp_path / (stem + ".gz"), "wb") as f:
    f.write(content)
  return tmp_path / (stem + ".gz")


def test_bad_magic_names_file_and_magic(tmp_path):
  path = _corrupt(tmp_path, "train-images-idx3-ubyte", gzip.compress(b"\x12\x34\x56\x78" + bytes(100)))
  with pytest.raises(ValueError, match="not an IDX file: magic bytes '12345678'") as e:
    data.load("mnist", data_dir=tmp_path, validation_size=0)
  assert str(path) in str(e.value) and "--config.data.data_dir" in str(e.value)


def test_labels_file_in_place_of_images_is_rejected(tmp_path):
  make_idx_dir(tmp_path)
  write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros(30))
  with pytest.raises(ValueError, match="expected images"):
    data.load("mnist", data_dir=tmp_path, validation_size=0)


def test_truncated_gzip(tmp_path):
  raw = (tmp_path / "ok.gz")
  write_idx(raw, RNG.integers(0, 256, (30, 28, 28)))
  _corrupt(tmp_path, "train-images-idx3-ubyte", raw.read_bytes()[:-200])
  with pytest.raises(ValueError, match="truncated or corrupt gzip"):
    data.load("mnist", data_dir=tmp_path, validation_size=0)


def test_truncated_idx_body(tmp_path):
  make_idx_dir(tmp_path, gz=False)
  path = tmp_path / "t10k-images-idx3-ubyte"
  path.write_bytes(path.read_bytes()[:-1])
  with pytest.raises(ValueError, match="header .* needs 7840"):
    data.load("mnist", data_dir=tmp_path, validation_size=0)


def test_label_out_of_range(tmp_path):
  make_idx_dir(tmp_path)
  write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", [0, 1, 2, 3, 4, 5, 6, 7, 8, 10])
  with pytest.raises(ValueError, match=r"1 labels outside \[0, 10\) \(e.g. 10\)"):
    data.load("mnist", data_dir=tmp_path, validation_size=0)


def test_count_and_shape_mismatch(tmp_path):
  make_idx_dir(tmp_path)
  write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(29))
  with pytest.raises(ValueError, match="30 images but 29 labels"):
    data.load("mnist", data_dir=tmp_path, validation_size=0)
  make_idx_dir(tmp_path / "big", size=32)
  with pytest.raises(ValueError, match=r"shape \(32, 32, 1\), expected \(28, 28, 1\)"):
    data.load("mnist", data_dir=tmp_path / "big", validation_size=0)


def test_missing_files_say_which(tmp_path):
  make_idx_dir(tmp_path)
  os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
  with pytest.raises(FileNotFoundError, match="not t10k-labels-idx1-ubyte"):
    data.load("mnist", data_dir=tmp_path)


def test_nothing_found_says_where_and_how(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    data.load("fashion_mnist", data_dir=tmp_path, tfds_download=False)
  message = str(e.value)
  for part in (str(tmp_path), "TFDS", "train-images-idx3-ubyte.gz", "apt-get install dataset-fashion-mnist",
               "internet"):
    assert part in message


def test_unknown_dataset_and_misplaced_options():
  with pytest.raises(ValueError, match="unknown dataset 'imagenet'; valid names: cifar10, fashion_mnist, mnist"):
    data.load("imagenet")
  with pytest.raises(ValueError, match="for dataset 'synthetic' only"):
    data.load("mnist", noise=0.1)
  with pytest.raises(ValueError, match="validation_size must be >= 0"):
    data.load("mnist", validation_size=-1)


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10.


@pytest.mark.parametrize("archive", [False, True])
def test_cifar_python_batches_convert_to_nhwc(tmp_path, archive):
  train, test = make_cifar()
  write_cifar_python(tmp_path, train, test, archive=archive)
  ds = data.load("cifar10", data_dir=tmp_path, validation_size=4)
  assert ds.train.images.shape == (16, 32, 32, 3) and ds.test.images.shape == (6, 32, 32, 3)
  # A known pixel: row 1 of data_batch_1, y=2, x=5, green -> byte 1024 + 2 * 32 + 5 of that row.
  row = cifar_rows(train[0][0])[1]
  assert ds.train.images[1, 2, 5, 1] == np.float32(row[1024 + 2 * 32 + 5]) / 255
  all_train = np.concatenate([b[0] for b in train])
  np.testing.assert_array_equal(ds.train.images, all_train[:16] / np.float32(255))
  np.testing.assert_array_equal(ds.validation.labels, np.concatenate([b[1] for b in train])[16:])
  np.testing.assert_array_equal(ds.test.images * 255, test[0])
  assert ("archive" in ds.source) == archive and ds.class_names[0] == "airplane"


def test_cifar_binary_archive(tmp_path):
  train, test = make_cifar()
  with tarfile.open(tmp_path / "cifar-10-binary.tar.gz", "w:gz") as tar:
    for name, (images, labels) in [*[(f"data_batch_{i + 1}.bin", b) for i, b in enumerate(train)],
                                   ("test_batch.bin", test)]:
      raw = np.concatenate([np.asarray(labels, np.uint8)[:, None], cifar_rows(images)], axis=1).tobytes()
      info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
      info.size = len(raw)
      tar.addfile(info, io.BytesIO(raw))
  ds = data.load("cifar10", data_dir=tmp_path, validation_size=0)
  np.testing.assert_array_equal(ds.train.images * 255, np.concatenate([b[0] for b in train]))
  np.testing.assert_array_equal(ds.test.labels, test[1])


def test_cifar_corrupt_inputs(tmp_path):
  train, test = make_cifar()
  os.makedirs(tmp_path / "a")
  path = write_cifar_python(tmp_path / "a", train, test, archive=True)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(ValueError, match="truncated or corrupt archive"):
    data.load("cifar10", data_dir=tmp_path / "a")
  folder = write_cifar_python(tmp_path, train, test)
  with open(os.path.join(folder, "test_batch"), "wb") as f:
    pickle.dump({b"data": os.system}, f)  # Anything but plain arrays is refused, not executed.
  with pytest.raises(ValueError, match="refusing to unpickle"):
    data.load("cifar10", data_dir=tmp_path)
  with open(os.path.join(folder, "test_batch"), "wb") as f:
    f.write(pickle.dumps({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}))
  with pytest.raises(ValueError, match=r"must be uint8 of shape \(N, 3072\)"):
    data.load("cifar10", data_dir=tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Image folders.


def write_folders(root, classes, per_class, size, mode, ext, **save_kwargs):
  written = {}
  for split, n in (("train", per_class), ("test", 1)):
    for cls in classes:
      os.makedirs(root / split / cls)
      for i in range(n):
        shape = (size, size) if mode == "L" else (size, size, 3)
        pixels = RNG.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(pixels, mode).save(root / split / cls / f"{i:04d}{ext}", **save_kwargs)
        written[(split, cls, i)] = pixels
  return written


def test_png_folders_load_with_class_labels(tmp_path):
  written = write_folders(tmp_path, ["bird", "airplane", "truck"], 4, 32, "RGB", ".png")
  ds = data.load("cifar10", data_dir=tmp_path, validation_size=2)
  assert ds.train.images.shape == (10, 32, 32, 3) and ds.test.images.shape == (3, 32, 32, 3)
  np.testing.assert_array_equal(ds.test.labels, [0, 2, 9])  # test keeps file order: airplane, bird, truck
  np.testing.assert_array_equal(ds.test.images[2] * 255, written[("test", "truck", 0)])
  labels = np.concatenate([ds.train.labels, ds.validation.labels])
  assert sorted(labels.tolist()) == [0] * 4 + [2] * 4 + [9] * 4 and labels.tolist() != sorted(labels.tolist())
  assert ds.source == f"cifar10 from image folders train/<class>, test/<class> in {tmp_path}"
  again = data.load("cifar10", data_dir=tmp_path, validation_size=2)
  np.testing.assert_array_equal(again.train.images, ds.train.images)  # the train shuffle is fixed


def test_jpeg_folders_are_labelled_as_proxy_and_grayscale_folders_load(tmp_path):
  write_folders(tmp_path / "c", ["cat", "dog"], 2, 32, "RGB", ".jpg", quality=75)
  ds = data.load("cifar10", data_dir=tmp_path / "c", validation_size=0)
  assert ds.source.startswith("CIFAR-10 (JPEG q75 proxy) from image folders")
  written = write_folders(tmp_path / "m", ["3", "7"], 2, 28, "L", ".png")
  ds = data.load("mnist", data_dir=tmp_path / "m", validation_size=0)
  assert ds.train.images.shape == (4, 28, 28, 1)
  np.testing.assert_array_equal(ds.test.labels, [3, 7])
  np.testing.assert_array_equal(ds.test.images[1, ..., 0] * 255, written[("test", "7", 0)])


def test_image_folder_errors(tmp_path):
  write_folders(tmp_path, ["cat", "unicorn"], 1, 32, "RGB", ".png")
  with pytest.raises(ValueError, match="unknown class folder 'unicorn' for cifar10; valid names: airplane"):
    data.load("cifar10", data_dir=tmp_path)
  write_folders(tmp_path / "small", ["cat"], 1, 16, "RGB", ".png")
  with pytest.raises(ValueError, match="image is 16x16, expected 32x32"):
    data.load("cifar10", data_dir=tmp_path / "small")


# ---------------------------------------------------------------------------------------------------------------
# TFDS (mocked: no network) and synthetic.


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_source_with_mock_data(tmp_path, name, shape):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = data.load(name, data_dir=tmp_path, validation_size=2)
  assert ds.train.images.shape == (4, *shape) and ds.validation.images.shape == (2, *shape)
  assert ds.test.images.shape == (6, *shape)
  assert ds.train.images.dtype == np.float32 and 0 <= ds.train.images.min() and ds.train.images.max() <= 1
  assert ds.train.labels.dtype == np.int32 and ds.train.labels.max() < 10
  assert "TFDS" in ds.source and "data_source" in ds.source


def test_synthetic_is_seeded_configurable_and_learnable():
  a = data.load("synthetic", image_shape=(6, 5, 3), num_classes=4, train_size=400, test_size=200, seed=1)
  b = data.synthetic(image_shape=(6, 5, 3), num_classes=4, train_size=400, test_size=200, seed=1)
  c = data.synthetic(image_shape=(6, 5, 3), num_classes=4, train_size=400, test_size=200, seed=2)
  np.testing.assert_array_equal(a.train.images, b.train.images)
  assert not np.array_equal(a.train.images, c.train.images)
  assert a.train.images.shape == (360, 6, 5, 3) and len(a.validation) == 40 and a.num_classes == 4
  assert a.train.images.min() >= 0 and a.train.images.max() <= 1 and a.train.images.dtype == np.float32
  # Nearest class mean, fitted on train, classifies test well: the set is learnable.
  x = a.train.images.reshape(len(a.train), -1)
  means = np.stack([x[a.train.labels == k].mean(0) for k in range(4)])
  test = a.test.images.reshape(len(a.test), -1)
  predicted = np.argmin(((test[:, None] - means) ** 2).sum(-1), axis=1)
  assert (predicted == a.test.labels).mean() > 0.9
  with pytest.raises(ValueError, match="data_dir must be None"):
    data.load("synthetic", data_dir="/tmp")


# ---------------------------------------------------------------------------------------------------------------
# Batching.


def indexed(n):
  return {"image": np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32),
          "label": np.arange(n, dtype=np.int32)}


def test_same_seed_same_order_and_every_example_once_per_epoch():
  a = data.TrainBatches(indexed(103), 10, seed=3)
  b = data.TrainBatches(indexed(103), 10, seed=3)
  c = data.TrainBatches(indexed(103), 10, seed=4)
  assert a.steps_per_epoch == 10
  first = [x["label"] for x in a.iterate(num_steps=30)]
  assert all(np.array_equal(x, y["label"]) for x, y in zip(first, b.iterate(num_steps=30)))
  assert not all(np.array_equal(x, y["label"]) for x, y in zip(first, c.iterate(num_steps=30)))
  for epoch in range(3):
    seen = np.concatenate(first[10 * epoch:10 * (epoch + 1)])
    assert len(seen) == 100 and len(set(seen.tolist())) == 100  # 3 dropped, none repeated
  assert not np.array_equal(np.concatenate(first[:10]), np.concatenate(first[10:20]))  # reshuffled each epoch
  batch = a.batch_at(7)
  np.testing.assert_array_equal(batch["image"][:, 0], batch["label"])  # rows stay aligned across keys
  assert batch["image"].shape == (10, 3) and batch["label"].dtype == np.int32


def test_start_at_step_equals_skipping_steps():
  batches = data.TrainBatches(indexed(50), 8, seed=0)
  full = list(batches.iterate(num_steps=20))
  resumed = data.TrainBatches(indexed(50), 8, seed=0)  # a fresh object, as after a restart
  for i, batch in enumerate(resumed.iterate(start_step=13, num_steps=7)):
    np.testing.assert_array_equal(batch["label"], full[13 + i]["label"])
  np.testing.assert_array_equal(resumed.batch_at(5)["label"], full[5]["label"])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_the_single_process_batch(process_count):
  single = data.TrainBatches(indexed(40), 8, seed=1)
  shards = [data.TrainBatches(indexed(40), 8, seed=1, process_index=i, process_count=process_count)
            for i in range(process_count)]
  for step in (0, 4, 9):
    parts = [s.batch_at(step) for s in shards]
    assert parts[0]["label"].shape == (8 // process_count,)
    np.testing.assert_array_equal(np.concatenate([p["label"] for p in parts]), single.batch_at(step)["label"])
  ev_single = list(data.EvalBatches(indexed(13), 4))
  ev_shards = [list(data.EvalBatches(indexed(13), 4, process_index=i, process_count=2)) for i in range(2)]
  for j, whole in enumerate(ev_single):
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([ev_shards[0][j][key], ev_shards[1][j][key]]), whole[key])


def test_eval_batches_cover_every_example_with_padding_mask():
  split = data.Split(np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1) + 1, np.arange(10, dtype=np.int32))
  batches = data.EvalBatches(split, 4)
  assert len(batches) == 3
  out = list(batches)
  assert all(b["image"].shape == (4, 1, 1, 1) for b in out)
  np.testing.assert_array_equal(out[-1]["mask"], [True, True, False, False])
  np.testing.assert_array_equal(out[-1]["label"], [8, 9, 0, 0])
  assert out[-1]["image"][2:].sum() == 0
  labels = np.concatenate([b["label"][b["mask"]] for b in out])
  np.testing.assert_array_equal(labels, np.arange(10))  # fixed order, each once
  assert len(data.EvalBatches(split, 32)) == 1  # larger than the split: one padded batch


def test_batching_argument_errors():
  with pytest.raises(ValueError, match="batch_size 11 is larger than the dataset size 10"):
    data.TrainBatches(indexed(10), 11)
  with pytest.raises(ValueError, match="batch_size 6 .* divisible by process_count 4"):
    data.TrainBatches(indexed(10), 6, process_count=4)
  with pytest.raises(ValueError, match=r"process_index must be in \[0, 2\)"):
    data.EvalBatches(indexed(10), 4, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="same length"):
    data.TrainBatches({"image": np.zeros(4), "label": np.zeros(5)}, 2)
  with pytest.raises(ValueError, match="batch_size must be > 0"):
    pipeline.TrainBatches(indexed(4), 0)
  assert sources.NAMES == data.NAMES == ("cifar10", "fashion_mnist", "mnist", "synthetic")
