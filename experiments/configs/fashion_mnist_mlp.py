"""Fashion-MNIST MLP 784-512-512-10: the trainer's default and reference run (README results).

relu, He init, SGD momentum 0.9, lr 0.1 with cosine decay, batch 128, 5 epochs; 55k train / 5k validation.
"""

from dlcore_experiments.configs import schema


def get_config():
  return schema.train()
