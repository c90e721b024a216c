"""Krizhevsky et al. 2012, Fig. 1 on the CIFAR ConvNet: ReLU vs tanh, lecun_normal init, SGD momentum 0.9,
batch 128, 2 seeds, up to 30 epochs to 25% training error, each activation at its fastest rate: 0.003-0.1 trained
as one population per activation, widened (up to 3 rounds) until the fastest is interior; per-pixel mean
subtracted. Set data.data_dir to CIFAR-10 (or its JPEG proxy); model.init=cuda_convnet for the paper-era init."""

from dlcore_experiments.configs import schema


def get_config():
  return schema.relu_vs_tanh()
