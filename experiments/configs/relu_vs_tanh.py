"""Krizhevsky et al. 2012, Fig. 1 on the CIFAR ConvNet: ReLU vs tanh, lecun_normal init, SGD momentum 0.9,
batch 128, learning rate per activation from 0.003-0.1 after 2 sweep epochs, 2 seeds, up to 30 epochs to 25%
training error; per-pixel mean subtracted. Set data.data_dir to CIFAR-10 (or its JPEG proxy)."""

from dlcore_experiments.configs import schema


def get_config():
  return schema.relu_vs_tanh()
