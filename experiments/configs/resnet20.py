"""ResNet-20 on CIFAR-10 as He et al. 2016 Sec. 4.2 trained it: shortcut option A, per-pixel mean subtracted,
flips and 4-pixel crops, SGD momentum 0.9, L2 weight decay 1e-4, batch 128, lr 0.1 divided by 10 at 32k and
48k iterations, 64k iterations."""

from dlcore_experiments.configs import schema


def get_config():
  config = schema.train()
  config.data.dataset = "cifar10"
  config.data.preprocess = "mean_image"
  config.data.augment = "flip,crop"
  config.model.name = "resnet20"
  config.model.shortcut = "zero_pad"
  config.optimizer.learning_rate = 0.1
  config.optimizer.weight_decay = 1e-4
  config.optimizer.weight_decay_mode = "l2"
  config.schedule.name = "piecewise"
  config.schedule.boundaries = (32000, 48000)
  config.loop.steps = 64000
  return config
