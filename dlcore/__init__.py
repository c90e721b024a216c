"""dlcore: a JAX/Flax codebase for studying how deep networks train."""

__version__ = "0.1.0"
