"""Activation statistics at initialisation (cs231n): the lecture's eight cases side by side, with gradients, on a
10 x 500 MLP without biases fed 1000 unit-Gaussian inputs (the README's main job)."""

from dlcore_experiments.configs import schema


def get_config():
  config = schema.activation_stats()
  config.study.compare = True
  config.study.grads = True
  return config
