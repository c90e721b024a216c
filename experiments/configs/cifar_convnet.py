"""The four-layer CIFAR-10 ConvNet (Krizhevsky et al. 2012 Fig. 1) on CIFAR-10 with cuda-convnet's recipe:
per-pixel mean subtracted, flips and crops, SGD momentum 0.9 at lr 0.01 with cosine decay, L2 weight decay 5e-4,
30 epochs."""

from dlcore_experiments.configs import schema


def get_config():
  config = schema.train()
  config.data.dataset = "cifar10"
  config.data.preprocess = "mean_image"
  config.data.augment = "flip,crop"
  config.model.name = "cifar_convnet"
  config.optimizer.learning_rate = 0.01
  config.optimizer.weight_decay = 5e-4
  config.optimizer.weight_decay_mode = "l2"
  config.loop.epochs = 30.0
  return config
