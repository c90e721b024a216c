"""Transfer learning on Fashion-MNIST with the MLP 784-512-512: stage 1 on classes 0-4 (T-shirt/top ... coat),
3 epochs; stage 2 on classes 5-9 (sandal ... ankle boot) with 100, 1,000 and all (about 5,500) examples per
class, from scratch, fine-tuned (transferred layers at 0.1x the learning rate) and with frozen features, 600 steps
of 128 each. Set data.data_dir to the Fashion-MNIST IDX files."""

from dlcore_experiments.configs import schema


def get_config():
  return schema.transfer()
