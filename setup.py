"""Builds dlcore's optional C++ extension, dlcore.ops._onednn (oneDNN convolutions as XLA FFI handlers).

Everything else is declared in pyproject.toml. The extension needs a C++ compiler, the XLA FFI headers that
jaxlib ships and oneDNN's headers and library from the pip packages onednn-devel-cpu-gomp / onednn-cpu-gomp
(build requirements on x86_64 Linux). Any failure prints one line and leaves the install to complete without
it: dlcore then runs every convolution on XLA.
"""

import importlib.metadata
import importlib.util
import pathlib
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _installed_file(distribution: str, path: str) -> pathlib.Path:
  """The installed file of `distribution` whose path ends with `path`."""
  for f in importlib.metadata.distribution(distribution).files or []:
    if f.as_posix().endswith(path):
      return pathlib.Path(f.locate()).resolve()
  raise FileNotFoundError(f"{path} not in {distribution}")


class OptionalBuildExt(build_ext):
  """build_ext that finds the headers and library at build time and never fails the install."""

  def run(self):
    try:
      jaxlib = pathlib.Path(importlib.util.find_spec("jaxlib").submodule_search_locations[0])
      headers = _installed_file("onednn-devel-cpu-gomp", "include/oneapi/dnnl/dnnl.hpp").parents[2]
      library = _installed_file("onednn-cpu-gomp", "/libdnnl.so.3").parent
      for ext in self.extensions:
        ext.include_dirs += [str(jaxlib / "include"), str(headers)]
        ext.library_dirs += [str(library)]
      super().run()
    except Exception as e:  # pylint: disable=broad-except
      print(f"dlcore: oneDNN convolution extension not built ({type(e).__name__}: {e}); convolutions will run on "
            "XLA", file=sys.stderr)


setup(ext_modules=[Extension("dlcore.ops._onednn", ["dlcore/ops/onednn_conv.cc"], libraries=["dnnl"],
                             extra_compile_args=["-std=c++17", "-O2", "-w"], extra_link_args=["-s"], language="c++")],
      cmdclass={"build_ext": OptionalBuildExt})
