"""Coarse-to-fine search of learning rate x weight decay for the trainer's Fashion-MNIST MLP (784-512-512-10).

Stage 1: 32 settings x 1 epoch, learning rate log-uniform on [1e-3, 3] and decoupled weight decay on [1e-6, 0.1];
stage 2: 16 settings x 3 epochs around the top 4; final: the top 2 x 3 seeds x 5 epochs (the trainer's length),
then the test set. Everything else is the trainer's reference run (momentum 0.9, warmup-cosine, batch 128).
"""

from dlcore_experiments.configs import schema


def get_config():
  return schema.sweep()
