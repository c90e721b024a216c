"""The `[tfds]` extra: with it, TFDS downloads and prepares MNIST for `dlcore.data.load(..., tfds_download=True)`.

There is no network here, so the four original MNIST files (small ones, in the real IDX gzip format) are served
from a local HTTP server that stands in for the dataset's URL; everything after the URL is TFDS's real path:
download, extraction, preparation with TensorFlow into array_record files, and `tfds.data_source`.
"""

import functools
import http.server
import os
import threading

import numpy as np
import pytest

from dlcore import data
from test_data import make_idx_dir


@pytest.fixture
def served(tmp_path):
  """The MNIST files of a small set, served over HTTP from 127.0.0.1; yields (url, arrays)."""
  arrays = make_idx_dir(tmp_path / "files", n_train=40, n_test=12)
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "files"))
  handler.log_message = lambda *args: None
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{server.server_address[1]}/", arrays
  server.shutdown()


def test_the_tfds_extra_downloads_and_prepares_mnist(served, tmp_path, monkeypatch):
  import tensorflow  # noqa: F401  the extra's dependency: fails here when it is missing
  import tensorflow_datasets as tfds
  from tensorflow_datasets.image_classification import mnist
  url, arrays = served
  monkeypatch.setattr(mnist.MNIST, "URL", url)
  monkeypatch.setattr(mnist, "_TRAIN_EXAMPLES", 40)
  monkeypatch.setattr(mnist, "_TEST_EXAMPLES", 12)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  with pytest.raises(FileNotFoundError, match=r"could not find dataset 'mnist'.*pip install 'dlcore\[tfds\]'"):
    data.load("mnist", data_dir=tmp_path / "tfds", validation_size=0)
  dataset = data.load("mnist", data_dir=tmp_path / "tfds", validation_size=0, tfds_download=True)
  assert "TFDS 'mnist'" in dataset.source
  for split, stem in ((dataset.train, "train"), (dataset.test, "t10k")):  # TFDS shuffles examples when it writes
    images = (split.images[..., 0] * 255).round().astype(np.uint8)
    served_images = arrays[f"{stem}-images-idx3-ubyte"].astype(np.uint8)
    order, served_order = np.lexsort(images.reshape(len(images), -1).T), np.lexsort(
        served_images.reshape(len(served_images), -1).T)
    np.testing.assert_array_equal(images[order], served_images[served_order])
    np.testing.assert_array_equal(split.labels[order], arrays[f"{stem}-labels-idx1-ubyte"][served_order])
  prepared = tfds.builder("mnist", data_dir=str(tmp_path / "tfds"))
  assert prepared.is_prepared() and any(f.endswith(".array_record-00000-of-00001") or "array_record" in f
                                        for f in os.listdir(prepared.data_dir))
