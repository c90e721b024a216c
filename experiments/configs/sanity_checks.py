"""cs231n's sanity checks before training the trainer's default run: the Fashion-MNIST MLP 784-512-512-10 (relu,
He init), cross-entropy, L2 strengths 1e-3..1, momentum SGD at lr 0.1 for overfitting 32 examples."""

from dlcore_experiments.configs import schema


def get_config():
  return schema.sanity_checks()
