"""Srivastava et al. 2014, Table 2: 2x800 logistic; 3x1024 logistic / ReLU with dropout (keep 0.8 inputs, 0.5
hidden), + max-norm c = 2; the 3x1024 ReLU control without dropout. Momentum 0.5 -> 0.95, exponentially decaying
learning rate, batch 100 (falls back to Fashion-MNIST when MNIST is absent, saying so)."""

from dlcore_experiments.configs import schema


def get_config():
  return schema.dropout_mnist()
