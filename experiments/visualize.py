r"""Pictures of a finished trainer run: its first-layer filters before and after training, and a 2-D embedding of
the test set's penultimate features coloured by class.

  python -m experiments.visualize --run=runs/fmnist_mlp                  # t-SNE of 2000 test images
  python -m experiments.visualize --run=runs/lenet5 --embedding=pca --points=10000 --out=/tmp/lenet5_pictures

--run is the --workdir of an experiments.train run that finished (results.json written): its config.json names
the data and model, the latest checkpoint in checkpoints/ gives the trained weights, and the run's seed rebuilds
the initial ones. Written to --out (default RUN/pictures), only once everything has been computed:

  filters.png              the first layer at initialisation, after training and the change (trained minus
                           initial), side by side: a conv net's kernels as one tile per output channel (RGB for 3
                           input channels, grey otherwise), an MLP's first --filters hidden units as weight images
                           of the input's shape; every tile is scaled to its own min (black) and max (white)
  embedding_<method>.png   --points test images (a seeded subsample) embedded by their penultimate features (the
                           model without its classifier), by exact t-SNE (dlcore.embedding; at most 5000 points)
                           or PCA (axes: the share of variance each principal axis explains)
  results.json, config.json
"""

import json
import os
import sys

from absl import flags
from flax import traverse_util
import jax
import numpy as np

from dlcore import checkpoint, data, embedding, stats
from . import common, config_lib, train_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("run", None, "Workdir of a finished experiments.train run (config.json, checkpoints/, "
                    "results.json).", required=True)
flags.DEFINE_string("out", None, "Where the pictures go (default: RUN/pictures).")
flags.DEFINE_enum("embedding", "tsne", ["tsne", "pca"], "How the penultimate features are embedded in 2-D: exact "
                  "t-SNE (O(points^2), at most 5000 points) or PCA.")
flags.DEFINE_integer("points", 2000, "Test images embedded: a seeded subsample (all of them when the test set is "
                     "smaller).")
flags.DEFINE_float("perplexity", 30.0, "t-SNE perplexity (about the number of neighbours each point keeps); "
                   "below points - 1. Only with --embedding=tsne.")
flags.DEFINE_integer("filters", 64, "Most first-layer units drawn (the first ones).")
flags.DEFINE_integer("seed", 0, "Seed of the test-image subsample.")

MAX_TSNE_POINTS = 5000
FEATURE_BATCH = 1000


def check_flags() -> None:
  """ValueError naming the flag for a value that cannot work; nothing is read before these pass."""
  for name, least in (("points", 2), ("filters", 1), ("seed", 0)):
    if FLAGS[name].value < least:
      raise ValueError(f"--{name} must be >= {least}, got {FLAGS[name].value}")
  if FLAGS.embedding == "pca":
    if FLAGS["perplexity"].present:
      raise ValueError("--perplexity is read only with --embedding=tsne")
  elif FLAGS.points > MAX_TSNE_POINTS:
    raise ValueError(f"--points={FLAGS.points}: exact t-SNE takes at most {MAX_TSNE_POINTS} points (O(points^2) "
                     "time and memory); use fewer, or --embedding=pca")
  elif not 1 <= FLAGS.perplexity < FLAGS.points - 1:
    raise ValueError(f"--perplexity={FLAGS.perplexity:g} must be in [1, points - 1) with --points={FLAGS.points}")


def check_run(run: str):
  """The config of the finished trainer run in `run` (ValueError naming --run otherwise)."""
  if not run or not os.path.isdir(run):
    raise ValueError(f"--run {run!r} is not a folder; give the --workdir of a finished experiments.train run")
  if not os.path.isfile(os.path.join(run, "config.json")):
    raise ValueError(f"--run {run} has no config.json; it is not an experiments.train workdir")
  try:
    config = config_lib.load(run, train_lib.BINARY)
  except config_lib.ConfigError as e:
    raise ValueError(f"--run {run}: {e}") from None
  if not os.path.isdir(os.path.join(run, "checkpoints")) or not os.path.isfile(os.path.join(run, "results.json")):
    raise ValueError(f"--run {run} is not a finished run (no results.json or checkpoints/); finish it with "
                     f"`python -m experiments.train --workdir={run}` (the same command resumes it)")
  return config


def filter_tiles(kernel, image_shape: tuple[int, ...], count: int) -> np.ndarray:
  """The first `count` units of a first-layer kernel as images [n, h, w, c], each scaled by its own min and max
  to [0, 1] (a constant one to 0.5): unit i of a conv kernel [kh, kw, cin, cout] is kernel[..., i]; of a dense
  kernel [prod(image_shape), units] on flattened images, column i in the image's shape (a 'weight image')."""
  k = np.asarray(kernel, np.float64)
  if k.ndim == 4:
    tiles = np.moveaxis(k, -1, 0)
  elif k.ndim == 2 and k.shape[0] == np.prod(image_shape):
    tiles = k.T.reshape((-1, *image_shape))
  else:
    raise ValueError(f"a first-layer kernel of shape {k.shape} is neither a conv kernel nor a dense kernel on "
                     f"flattened {image_shape} images")
  tiles = tiles[:count]
  lo = tiles.min(axis=(1, 2, 3), keepdims=True)
  span = tiles.max(axis=(1, 2, 3), keepdims=True) - lo
  return np.where(span > 0, (tiles - lo) / np.where(span > 0, span, 1.0), 0.5)


GRID_COLOUR = (0.72, 0.8, 0.93)  # no grey: a grey tile's black or white pixels never merge with the grid


def tile_grid(tiles: np.ndarray, cols: int, pad: int = 1) -> np.ndarray:
  """Tiles [n, h, w, c] in rows of `cols`, left to right, each framed by `pad` pixels of GRID_COLOUR, as one RGB
  image: 3-channel tiles as colour, others as grey (the mean over their channels)."""
  n, h, w, c = tiles.shape
  if c != 3:
    tiles = np.repeat(tiles.mean(axis=-1, keepdims=True), 3, axis=-1)
  rows = -(-n // cols)
  grid = np.empty((pad + rows * (h + pad), pad + cols * (w + pad), 3))
  grid[:] = GRID_COLOUR
  for i, tile in enumerate(tiles):
    top, left = (pad + k * (size + pad) for k, size in zip(divmod(i, cols), (h, w)))
    grid[top:top + h, left:left + w] = tile
  return grid


def first_layer(model, variables, sample) -> tuple[str, tuple[str, ...]]:
  """(name, params path of its kernel) of the model's first layer in call order (the first that records its
  activations), e.g. ('conv1', ('conv1', 'linear', 'kernel'))."""
  name = stats.activations(model, variables, sample[:1])[0]["name"]
  module = tuple(name.split("/"))
  paths = [p for p in traverse_util.flatten_dict(variables["params"]) if p[:len(module)] == module
           and p[-1] == "kernel"]
  if len(paths) != 1:
    raise ValueError(f"the first layer {name} has {len(paths)} kernels, not one")
  return name, paths[0]


def filters_figure(before: np.ndarray, after: np.ndarray, change: np.ndarray, *, step: int, accuracy: float,
                   title: str, start: str = "at initialisation (step 0)"):
  """Tile grids of the same units side by side: at initialisation, trained, and the change between them (which
  shows what training added where the initial noise still dominates the trained weights); `start` names the
  first panel (a transfer run starts from its source's weights)."""
  cols = int(np.ceil(np.sqrt(len(before))))
  pad = max(1, before.shape[1] // 10)
  grids = [tile_grid(tiles, cols, pad) for tiles in (before, after, change)]
  height, width = grids[0].shape[:2]
  fig, axes = common.plt.subplots(1, 3, figsize=(15, 4.8 * height / width + 1.0), layout="constrained")
  for ax, grid, label in ((axes[0], grids[0], start),
                          (axes[1], grids[1], f"after training (step {step}, test accuracy {accuracy:.1%})"),
                          (axes[2], grids[2], "change: trained minus step 0")):
    ax.imshow(grid, interpolation="nearest")
    ax.set_title(label, fontsize=11)
    ax.axis("off")
  fig.suptitle(title, fontsize=12)
  return fig


def penultimate_features(config, state, images: np.ndarray) -> np.ndarray:
  """The trained model's flattened penultimate features of `images`: the same model built with num_classes=0,
  applied (eval mode) with the trained params minus the classifier."""
  model = train_lib.build_model(config, 0)
  params = {k: v for k, v in state.params.items() if k != "classifier"}
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  variables = {"params": params, "batch_stats": state.batch_stats}
  return np.concatenate([np.asarray(apply(variables, images[i:i + FEATURE_BATCH]), np.float64)
                         for i in range(0, len(images), FEATURE_BATCH)])


def embedding_figure(points: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...], *, axis_labels,
                     title: str):
  """A scatter of 2-D points coloured by class, with a legend naming the classes beside the axes."""
  fig, ax = common.plt.subplots(figsize=(9.5, 7), layout="constrained")
  cmap = common.plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
  for k, name in enumerate(class_names):
    mine = labels == k
    ax.scatter(points[mine, 0], points[mine, 1], s=7, color=cmap(k % cmap.N), alpha=0.75, linewidths=0,
               label=f"{name} ({mine.sum()})")
  ax.set(xlabel=axis_labels[0], ylabel=axis_labels[1])
  ax.set_title(title, fontsize=11)
  ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), title="class (points)", markerscale=3, frameon=False)
  return fig


def restore(config, run: str, dataset):
  """(initial state, trained state, its step, a training batch): the run's initial weights rebuilt from its
  seed and first batch (what LSUV sees) and, for a transfer run, its source's checkpoint (transfer.init_from),
  and its latest checkpoint restored into them."""
  sample = data.TrainBatches(dataset.train, config.loop.batch_size, seed=config.seed).batch_at(0)["image"]
  initial = train_lib.build_state(config, dataset, sample)
  if config.transfer.init_from is not None:
    initial = train_lib.transfer_start(config, initial, log=lambda message: None)
  with checkpoint.Checkpointer(os.path.join(run, "checkpoints")) as ckpt:
    trained, meta = ckpt.restore(initial)
  return initial, trained, int(meta["step"]), sample


def draw_filters(config, dataset, initial, trained, sample, *, step: int, accuracy: float):
  """(filters figure, its results.json entry)."""
  layer, path = first_layer(train_lib.build_model(config, dataset.num_classes), initial.variables(), sample)
  kernels = [np.asarray(traverse_util.flatten_dict(s.params)[path], np.float64) for s in (initial, trained)]
  tiles = [filter_tiles(k, dataset.image_shape, FLAGS.filters) for k in (*kernels, kernels[1] - kernels[0])]
  shape, drawn = kernels[0].shape, len(tiles[0])
  if len(shape) == 4:
    what = f"{layer} kernels {shape[0]}x{shape[1]}x{shape[2]}: {drawn} of {shape[3]} output channels"
  else:
    image = "x".join(map(str, dataset.image_shape[:2]))
    what = f"{layer} weight images {image}: units 1-{drawn} of {shape[1]}"
  title = (f"first-layer filters of {config.model.name} ({what})\n"
           "each tile scaled to its own min (black) and max (white)")
  info = {"file": "filters.png", "layer": layer, "kernel_shape": list(shape), "units_drawn": drawn,
          "units": shape[-1]}
  start = ("at initialisation (step 0)" if config.transfer.init_from is None else
           f"step 0: transferred from run {os.path.basename(os.path.normpath(config.transfer.init_from))}")
  return filters_figure(*tiles, step=step, accuracy=accuracy, title=title, start=start), info


def draw_embedding(config, dataset, trained, *, step: int, accuracy: float):
  """(embedding figure, its results.json entry) of a seeded subsample of the test set."""
  test = dataset.test
  n = min(FLAGS.points, len(test.labels))
  if n < FLAGS.points:
    if FLAGS.embedding == "tsne" and FLAGS.perplexity >= n - 1:
      raise ValueError(f"--perplexity={FLAGS.perplexity:g} must be below {n - 1}: the test set has only {n} images")
    print(f"--points={FLAGS.points} is more than the {n} test images: embedding all of them")
  chosen = np.sort(np.random.default_rng(FLAGS.seed).choice(len(test.labels), n, replace=False))
  features = penultimate_features(config, trained, test.images[chosen])
  print(f"embedding {n} test images' {features.shape[1]}-d penultimate features by {FLAGS.embedding}")
  info = {"file": f"embedding_{FLAGS.embedding}.png", "method": FLAGS.embedding, "points": n,
          "feature_dim": features.shape[1]}
  if FLAGS.embedding == "pca":
    points, explained = embedding.pca(features, 2)
    axis_labels = [f"principal axis {i + 1} ({share:.1%} of the variance)" for i, share in enumerate(explained)]
    info["explained_variance"] = [float(v) for v in explained]
    method = "PCA"
  else:
    points = embedding.tsne(features, perplexity=FLAGS.perplexity)
    axis_labels = ["t-SNE 1 (no units)", "t-SNE 2 (no units)"]
    info["perplexity"] = FLAGS.perplexity
    method = f"t-SNE (perplexity {FLAGS.perplexity:g})"
  title = (f"{method} of the {features.shape[1]}-d penultimate features of {n} {config.data.dataset} test "
           f"images\n{config.model.name} after {step} steps, test accuracy {accuracy:.1%}")
  fig = embedding_figure(points, test.labels[chosen], dataset.class_names, axis_labels=axis_labels, title=title)
  return fig, info


def main(argv):
  del argv
  common.quiet_logs()
  run = FLAGS.run
  try:  # everything is computed before anything is written
    check_flags()
    config = check_run(run)
    out = FLAGS.out or os.path.join(run, "pictures")
    if os.path.exists(out) and not os.path.isdir(out):
      raise ValueError(f"--out {out} exists and is not a folder")
    with open(os.path.join(run, "results.json")) as f:
      accuracy = float(json.load(f)["test_accuracy"])
    dataset = train_lib.load_dataset(config)
    if config.data.preprocess != "none":
      dataset, _ = data.preprocess.preprocess_dataset(dataset, config.data.preprocess)
    initial, trained, step, sample = restore(config, run, dataset)
    print(f"{run}: {config.model.name} on {config.data.dataset}, checkpoint of step {step}")
    filters_fig, filters_info = draw_filters(config, dataset, initial, trained, sample, step=step,
                                             accuracy=accuracy)
    embedding_fig, embedding_info = draw_embedding(config, dataset, trained, step=step, accuracy=accuracy)
  except (ValueError, FileNotFoundError, checkpoint.CorruptCheckpoint) as e:
    sys.exit(f"error: {e}")

  os.makedirs(out, exist_ok=True)
  common.save_figure(filters_fig, os.path.join(out, filters_info["file"]))
  common.save_figure(embedding_fig, os.path.join(out, embedding_info["file"]))
  common.write_json(os.path.join(out, "results.json"), {"run": run, "step": step, "test_accuracy": accuracy,
                                                        "filters": filters_info, "embedding": embedding_info})
  call = {name: FLAGS[name].value for name in ("run", "embedding", "points", "perplexity", "filters", "seed")}
  call.update(out=out, perplexity=FLAGS.perplexity if FLAGS.embedding == "tsne" else None)
  common.write_json(os.path.join(out, "config.json"), {"binary": "visualize", **call})
  print(f"wrote {out}/{filters_info['file']}, {embedding_info['file']}, results.json, config.json")


def run():
  common.run_main(main, __name__)


if __name__ == "__main__":
  run()
