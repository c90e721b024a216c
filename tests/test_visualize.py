"""experiments.visualize: filter tiles and their grid against numpy, the binary end to end on a tiny finished
trainer run, and bad input refused in one line naming the flag with nothing written."""

import json
import os
import shutil

from absl import flags
import numpy as np
import pytest

from experiments import train_lib, visualize
from experiments.configs import schema

FLAGS = flags.FLAGS


def _scaled(a):
  return (a - a.min()) / (a.max() - a.min())


def test_conv_kernel_tiles_are_its_output_channels_each_scaled_to_its_own_range():
  kernel = np.random.default_rng(0).standard_normal((3, 4, 3, 5)) * np.arange(1, 6)
  tiles = visualize.filter_tiles(kernel, (8, 8, 3), count=4)
  assert tiles.shape == (4, 3, 4, 3)
  for i in range(4):
    np.testing.assert_allclose(tiles[i], _scaled(kernel[..., i]), atol=1e-12)


def test_dense_kernel_tiles_are_its_columns_as_weight_images():
  kernel = np.random.default_rng(1).standard_normal((6 * 5 * 1, 3))
  kernel[:, 2] = 7.0  # a constant unit: mid-grey, not a division by zero
  tiles = visualize.filter_tiles(kernel, (6, 5, 1), count=64)
  assert tiles.shape == (3, 6, 5, 1)
  for i in range(2):
    np.testing.assert_allclose(tiles[i], _scaled(kernel[:, i].reshape(6, 5, 1)), atol=1e-12)
  assert np.all(tiles[2] == 0.5)
  with pytest.raises(ValueError, match="neither a conv kernel nor a dense kernel"):
    visualize.filter_tiles(kernel, (5, 5, 1), count=3)


def test_tile_grid_places_tile_i_at_row_i_div_cols_and_column_i_mod_cols():
  tiles = np.random.default_rng(2).uniform(size=(5, 4, 3, 1))
  grid = visualize.tile_grid(tiles, cols=3, pad=2)
  assert grid.shape == (2 + 2 * (4 + 2), 2 + 3 * (3 + 2), 3)
  covered = np.zeros(grid.shape[:2], bool)
  for i, tile in enumerate(tiles):
    r, c = divmod(i, 3)
    block = (slice(2 + r * 6, 2 + r * 6 + 4), slice(2 + c * 5, 2 + c * 5 + 3))
    np.testing.assert_array_equal(grid[block], np.repeat(tile, 3, axis=-1))  # grey on all three channels
    covered[block] = True
  assert np.all(grid[~covered] == visualize.GRID_COLOUR)  # the frames and the empty sixth slot
  rgb = np.random.default_rng(3).uniform(size=(2, 2, 2, 3))
  np.testing.assert_array_equal(visualize.tile_grid(rgb, cols=2)[1:3, 4:6], rgb[1])


@pytest.fixture
def call(monkeypatch):
  """visualize.main under the given flags, in this process; flags are reset afterwards."""
  monkeypatch.setattr(visualize.common, "quiet_logs", lambda: None)

  def run(*args):
    FLAGS.unparse_flags()
    FLAGS(["dlcore-visualize", *args])
    visualize.main([])

  yield run
  FLAGS.unparse_flags()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  config = schema.train()
  config.data.dataset = "synthetic"
  config.model.hidden = (16,)
  config.optimizer.learning_rate = 0.05
  config.schedule.name = "constant"
  config.loop.update(batch_size=64, steps=30, log_every=10)
  train_lib.train_and_evaluate(config, workdir, log=lambda message: None)
  return workdir


def test_binary_draws_filters_and_embeddings_of_a_finished_run(finished_run, call, tmp_path):
  call(f"--run={finished_run}", "--points=120", "--perplexity=10")
  out = os.path.join(finished_run, "pictures")
  results = json.load(open(os.path.join(out, "results.json")))
  assert results["step"] == 30
  assert results["filters"] == {"file": "filters.png", "layer": "layer0", "kernel_shape": [64, 16],
                                "units_drawn": 16, "units": 16}
  assert results["embedding"] == {"file": "embedding_tsne.png", "method": "tsne", "points": 120,
                                  "feature_dim": 16, "perplexity": 10.0}
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["binary"] == "visualize" and config["embedding"] == "tsne" and config["out"] == out
  for name in ("filters.png", "embedding_tsne.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0

  call(f"--run={finished_run}", "--embedding=pca", "--points=900", "--filters=4", f"--out={tmp_path / 'pca'}")
  results = json.load(open(tmp_path / "pca" / "results.json"))
  assert results["embedding"]["points"] == 500  # the whole synthetic test set
  explained = results["embedding"]["explained_variance"]
  assert explained[0] >= explained[1] > 0 and sum(explained) <= 1
  assert results["filters"]["units_drawn"] == 4
  assert sorted(os.listdir(tmp_path / "pca")) == ["config.json", "embedding_pca.png", "filters.png",
                                                  "results.json"]


def _refused(call, *args) -> str:
  """The one-line message of a refused call, flag parsing or the binary's own check."""
  with pytest.raises((SystemExit, flags.Error)) as refusal:
    call(*args)
  message = str(refusal.value.code if isinstance(refusal.value, SystemExit) else refusal.value)
  assert "\n" not in message, message
  return message


def test_bad_input_is_refused_in_one_line_naming_the_flag_with_nothing_written(finished_run, call, tmp_path):
  out = f"--out={tmp_path / 'out'}"
  assert "--run" in _refused(call, out)
  assert "--run" in _refused(call, f"--run={tmp_path / 'missing'}", out)
  unfinished = tmp_path / "unfinished"
  unfinished.mkdir()
  shutil.copy(os.path.join(finished_run, "config.json"), unfinished)
  assert "is not a finished run" in _refused(call, f"--run={unfinished}", out)
  assert "--embedding" in _refused(call, f"--run={finished_run}", "--embedding=umap", out)
  assert "--perplexity" in _refused(call, f"--run={finished_run}", "--embedding=pca", "--perplexity=5", out)
  assert "--perplexity" in _refused(call, f"--run={finished_run}", "--points=20", "--perplexity=30", out)
  assert "--points" in _refused(call, f"--run={finished_run}", "--points=6000", out)
  assert "--perplexity" in _refused(call, f"--run={finished_run}", "--points=900", "--perplexity=499", out)  # 500 test
  assert not (tmp_path / "out").exists() and os.listdir(unfinished) == ["config.json"]
