"""Learning-rate range test on the trainer's reference run: Fashion-MNIST MLP 784-512-512-10, relu, He init, SGD
momentum 0.9, batch 128; the rate rises from 1e-6 to 10 over 200 steps, stopping once the loss diverges."""

from dlcore_experiments.configs import schema


def get_config():
  return schema.lr_finder()
