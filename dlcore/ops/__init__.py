"""Operations with backends of their own: `conv`, 2-D convolution with oneDNN on CPU behind DLCORE_CPU_CONV."""

from dlcore.ops import conv

__all__ = ["conv"]
