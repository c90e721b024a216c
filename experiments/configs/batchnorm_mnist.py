"""Ioffe & Szegedy 2015, Fig. 1: 3x100 sigmoid MLP on MNIST, N(0, 0.01^2) init, SGD lr 0.5, batch 60, 50,000
steps per net, with and without BatchNorm (falls back to Fashion-MNIST when MNIST is absent, saying so)."""

from dlcore_experiments.configs import schema


def get_config():
  return schema.batchnorm_mnist()
