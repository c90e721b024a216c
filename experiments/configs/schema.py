"""The one config schema of every binary: typed ml_collections groups with their defaults.

A key means the same thing in every binary that reads it and lives in the same group: `data` (what is read),
`model`, `loss`, `optimizer`, `schedule`, `loop` (how long and how often), `parallel`, `ensemble`, `transfer`
(starting from another run's weights), and `study` for what only one study has. Each binary reads a subset
(`SCHEMAS`); a config file gives the binary's schema with some values changed, and `experiments.config_lib`
refuses keys outside it. None means "the default of the thing it configures" (the model's BatchNorm placement,
a schedule's own default for its parameter, ...).
"""

import ml_collections
from ml_collections.config_dict import placeholder

__all__ = ["SCHEMAS", "activation_stats", "batchnorm_mnist", "dropout_mnist", "lr_finder", "relu_vs_tanh",
           "sanity_checks", "sweep", "train", "transfer"]


def _data() -> dict:
  return dict(dataset="fashion_mnist", data_dir=placeholder(str), download=False, validation_size=-1,
              preprocess="none", augment="", subset=0, classes=(), per_class=0, resident=True)


def _model() -> dict:
  return dict(name="mlp", hidden=(512, 512), activation="relu", init="he_normal", init_scale=placeholder(float),
              batchnorm=placeholder(str), bn_momentum=0.9, bn_running_var="biased", keep_prob=1.0,
              input_keep_prob=1.0, dropout_mode="inverted", shortcut="projection", dtype="float32")


def _loss() -> dict:
  return dict(name="cross_entropy", label_smoothing=0.0, hinge_delta=1.0, penalty="none", penalty_strength=0.0,
              l1_ratio=0.5)


def _optimizer() -> dict:
  # initial_momentum (None: constant) ramps linearly to momentum over momentum_ramp_epochs; max_norm: None, or c.
  return dict(name="momentum", learning_rate=0.1, momentum=0.9, initial_momentum=placeholder(float),
              momentum_ramp_epochs=0.0, weight_decay=0.0, weight_decay_mode="decoupled",
              clip_norm=placeholder(float), max_norm=placeholder(float))


def _schedule() -> dict:
  # Every schedule parameter of dlcore.optim; None leaves the chosen schedule's own default.
  return dict(name="warmup_cosine", step_size=placeholder(int), gamma=placeholder(float),
              boundaries=placeholder(tuple), decay_rate=placeholder(float), staircase=placeholder(bool),
              decay=placeholder(float), warmup_steps=placeholder(int), final_fraction=placeholder(float),
              decay_steps=placeholder(int), first_period=placeholder(int), period_mult=placeholder(int),
              min_fraction=placeholder(float))


def _loop() -> dict:
  return dict(batch_size=128, epochs=5.0, steps=0, eval_every=0, log_every=100, checkpoint_every=0,
              keep_checkpoints=3, patience=0, steps_per_call=0, diagnostics=False)


def _parallel() -> dict:
  return dict(num_devices=placeholder(int), bn_stats="global")


def _transfer() -> dict:
  # init_from: a finished trainer run's workdir whose last checkpoint seeds params and BatchNorm statistics;
  # reinit / freeze: layer names (top-level params entries) re-initialised / kept fixed; lr_scale: the
  # learning-rate factor of the transferred layers that are neither.
  return dict(init_from=placeholder(str), reinit=("classifier",), freeze=(), lr_scale=1.0)


def _pick(group: dict, **values) -> dict:
  """The keys of `group` named in `values`, with those defaults (a study reads only part of a group)."""
  unknown = sorted(set(values) - set(group))
  if unknown:
    raise KeyError(f"not schema keys: {unknown}")
  return {k: (values[k] if values[k] is not ... else group[k]) for k in values}


def train() -> ml_collections.ConfigDict:
  """The general trainer: every group in full (defaults: the Fashion-MNIST MLP reference run)."""
  return ml_collections.ConfigDict(dict(
      seed=0, data=_data(), model=_model(), loss=_loss(), optimizer=_optimizer(), schedule=_schedule(),
      loop=_loop(), parallel=_parallel(), ensemble=dict(snapshot=False, members=placeholder(tuple)),
      transfer=_transfer()))


def activation_stats() -> ml_collections.ConfigDict:
  """Activation statistics at initialisation (cs231n): an MLP on unit-Gaussian inputs, or the lecture's cases."""
  return ml_collections.ConfigDict(dict(
      seed=0,
      model=_pick(_model(), hidden=(500,) * 10, activation="tanh", init="normal", init_scale=..., batchnorm="none"),
      study=dict(input_dim=500, num_inputs=1000, grads=False, compare=False, bins=50,
                 cases=("tanh:normal:0.01", "tanh:normal:1.0", "tanh:lecun_normal", "relu:lecun_normal",
                        "relu:he_normal", "tanh:normal:0.01:before", "relu:normal:1.0:before", "tanh:lsuv"))))


def batchnorm_mnist() -> ml_collections.ConfigDict:
  """Ioffe & Szegedy 2015, Fig. 1: a 3x100 sigmoid MLP with and without BatchNorm."""
  return ml_collections.ConfigDict(dict(
      seed=0,
      data=_pick(_data(), dataset="mnist", data_dir=..., download=..., resident=...),
      model=_pick(_model(), init_scale=0.01),
      optimizer=_pick(_optimizer(), name="sgd", learning_rate=0.5, momentum=...),
      loop=_pick(_loop(), steps=50000, batch_size=60, eval_every=1000, log_every=1000, steps_per_call=...),
      parallel=_pick(_parallel(), num_devices=...),
      study=dict(unit=0, percentile_bn="batch")))


def dropout_mnist() -> ml_collections.ConfigDict:
  """Srivastava et al. 2014, Table 2: permutation-invariant MNIST MLPs with and without dropout and max-norm."""
  return ml_collections.ConfigDict(dict(
      seed=0,
      data=_pick(_data(), dataset="mnist", data_dir=..., download=..., resident=...),
      model=_pick(_model(), keep_prob=0.5, input_keep_prob=0.8),
      optimizer=_pick(_optimizer(), learning_rate=0.05, momentum=0.95, initial_momentum=0.5,
                      momentum_ramp_epochs=10.0, max_norm=2.0),
      schedule=_pick(_schedule(), decay_rate=0.98),
      loop=_pick(_loop(), epochs=100.0, batch_size=100, log_every=..., steps_per_call=...),
      study=dict(rows=("standard_2x800_logistic", "dropout_3x1024_logistic", "dropout_3x1024_relu",
                       "dropout_3x1024_relu_original", "dropout_maxnorm_3x1024_relu", "control_3x1024_relu"),
                 seeds=2)))


def relu_vs_tanh() -> ml_collections.ConfigDict:
  """Krizhevsky et al. 2012, Fig. 1: epochs to a training error, per activation, at each one's fastest rate."""
  return ml_collections.ConfigDict(dict(
      seed=0,
      data=_pick(_data(), dataset="cifar10", data_dir=..., subset=..., preprocess="mean_image"),
      model=_pick(_model(), init="lecun_normal"),  # or cuda_convnet: the paper-era per-layer init
      optimizer=_pick(_optimizer(), name=..., momentum=...),
      loop=_pick(_loop(), batch_size=...),
      study=dict(activations=("relu", "tanh"), lr_grid=(0.003, 0.01, 0.03, 0.1), widen_rounds=3,
                 target_error=0.25, max_epochs=30, seeds=2, stop_at_target=True)))


def sweep() -> ml_collections.ConfigDict:
  """Coarse-to-fine random search (cs231n) over the trainer's run, each stage one population."""
  return ml_collections.ConfigDict(dict(
      seed=0,
      data=_pick(_data(), dataset=..., data_dir=..., download=..., validation_size=..., preprocess=..., augment=...,
                 subset=...),
      model=_model(),
      loss=_pick(_loss(), name=..., label_smoothing=..., penalty=..., penalty_strength=..., l1_ratio=...),
      optimizer=_pick(_optimizer(), name=..., learning_rate=..., momentum=..., weight_decay=...),
      schedule=_schedule(),
      loop=_pick(_loop(), batch_size=..., log_every=...),
      parallel=_pick(_parallel(), num_devices=...),
      study=dict(space="learning_rate=log:1e-3:3, weight_decay=log:1e-6:1e-1", stage_sizes=(32, 16),
                 stage_epochs=(1.0, 3.0), top_k=4, final_top=2, final_seeds=3, final_epochs=5.0, edge=0.1)))


def lr_finder() -> ml_collections.ConfigDict:
  """Learning-rate range test (Smith 2017): the trainer's data, model, loss and optimiser (whose learning rate is
  what the study sweeps), trained with the rate rising exponentially from study.min_lr to study.max_lr."""
  return ml_collections.ConfigDict(dict(
      seed=0,
      data=_pick(_data(), dataset=..., data_dir=..., download=..., validation_size=..., preprocess=..., augment=...,
                 subset=...),
      model=_model(), loss=_loss(),
      optimizer=_pick(_optimizer(), name=..., momentum=..., weight_decay=..., weight_decay_mode=..., clip_norm=...),
      loop=_pick(_loop(), batch_size=...),
      study=dict(min_lr=1e-6, max_lr=10.0, ramp_steps=200, smooth=0.98, stop_factor=4.0)))


def sanity_checks() -> ml_collections.ConfigDict:
  """cs231n's sanity checks before a long run (dlcore.sanity): initial loss, loss against penalty strength,
  overfitting a small subset, a float64 gradient check; of the trainer's data, model, loss and optimiser."""
  return ml_collections.ConfigDict(dict(
      seed=0,
      data=_pick(_data(), dataset=..., data_dir=..., download=..., preprocess=...),
      model=_model(),
      loss=_pick(_loss(), name=..., label_smoothing=..., hinge_delta=..., penalty="l2", l1_ratio=...),
      optimizer=_pick(_optimizer(), name=..., learning_rate=..., momentum=...),
      study=dict(loss_examples=256, penalty_strengths=(1e-3, 1e-2, 1e-1, 1.0), subset_size=32, overfit_steps=500,
                 gradcheck_examples=4, gradcheck_coords=10, initial_loss_factor=2.0, gradcheck_tolerance=1e-5)))


def transfer() -> ml_collections.ConfigDict:
  """Transfer learning (experiments.transfer): train on study.source_classes, then on study.target_classes with
  study.target_sizes examples per class, from scratch, fine-tuned and with frozen features; every run is a
  trainer run, with the trainer's data, model, optimiser and loop keys."""
  return ml_collections.ConfigDict(dict(
      seed=0,
      data=_pick(_data(), dataset=..., data_dir=..., download=..., validation_size=..., preprocess=...,
                 resident=...),
      model=_model(),
      optimizer=_pick(_optimizer(), name=..., learning_rate=..., momentum=..., weight_decay=...),
      loop=_pick(_loop(), batch_size=..., log_every=..., steps_per_call=...),
      transfer=_pick(_transfer(), lr_scale=0.1),
      study=dict(source_classes=(0, 1, 2, 3, 4), target_classes=(5, 6, 7, 8, 9), target_sizes=(100, 1000, 0),
                 source_epochs=3.0, target_steps=600, methods=("scratch", "finetune", "frozen"))))


SCHEMAS = {"train": train, "activation_stats": activation_stats, "batchnorm_mnist": batchnorm_mnist,
           "dropout_mnist": dropout_mnist, "relu_vs_tanh": relu_vs_tanh, "sweep": sweep, "lr_finder": lr_finder,
           "sanity_checks": sanity_checks, "transfer": transfer}
