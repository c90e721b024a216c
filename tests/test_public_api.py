"""The public API: every public module has a docstring and an `__all__` that lists exactly its public functions and
classes (plus deliberate re-exports and constants), each resolving and documented, as are their public methods.

Public modules are the files and packages directly under dlcore/ and the submodules of dlcore.data and
dlcore.models whose names do not start with '_'. A docstring counts only when the object itself has one: classes
and overriding methods do not borrow their base's (as `inspect.getdoc` would let them), and the one-line
'Name(field, ...)' text that dataclasses and named tuples generate is not a docstring.
"""

import collections
import importlib
import inspect
import pathlib
import pkgutil
import re

import flax.linen as nn
import pytest

import dlcore

ROOT = pathlib.Path(dlcore.__file__).parent
PACKAGES = ("data", "models", "ops")  # subpackages whose submodules are public modules too


def _top_level_names() -> list[str]:
  """Modules directly under dlcore/: the .py files and the packages, without '_' names."""
  files = [p.stem for p in ROOT.glob("*.py") if not p.stem.startswith("_")]
  packages = [p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and not p.name.startswith("_")]
  return sorted(files + packages)


def _public_modules() -> list[str]:
  names = ["dlcore"] + [f"dlcore.{name}" for name in _top_level_names()]
  for package in PACKAGES:
    names += [f"dlcore.{package}.{info.name}" for info in pkgutil.iter_modules([str(ROOT / package)])
              if not info.name.startswith("_")]
  return names


MODULES = _public_modules()


def _is_api_object(obj) -> bool:
  """A class or a function (also a jitted or otherwise wrapped one), the objects that need docstrings."""
  if inspect.isclass(obj):
    return True
  try:
    return inspect.isfunction(inspect.unwrap(obj))
  except ValueError:  # a __wrapped__ cycle
    return False


def _own_doc(obj) -> str:
  """The docstring the object itself carries ('' when none, or when it is a generated 'Name(...)' line)."""
  doc = vars(obj).get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
  doc = inspect.cleandoc(doc) if isinstance(doc, str) else ""
  if inspect.isclass(obj) and re.fullmatch(rf"{re.escape(obj.__name__)}\(.*\)", doc):
    return ""  # written by dataclasses / namedtuple, not by a person
  return doc


def _public_methods(cls) -> dict[str, object]:
  """Public methods and properties defined on `cls` itself (qualname under the class), as their functions."""
  methods = {}
  for name in dir(cls):
    if name.startswith("_"):
      continue
    if name == "setup" and issubclass(cls, nn.Module):
      continue  # flax's hook; the class docstring describes the module
    attr = inspect.getattr_static(cls, name)
    if isinstance(attr, (staticmethod, classmethod)):
      attr = attr.__func__
    elif getattr(attr, "fget", None) is not None:  # a property (flax wraps those of modules)
      attr = attr.fget
    if not inspect.isfunction(attr) or not attr.__qualname__.startswith(cls.__qualname__ + "."):
      continue
    methods[name] = attr
  return methods


def _module(name: str):
  return importlib.import_module(name)


def test_dlcore_lists_every_module():
  names = _top_level_names()
  assert set(PACKAGES) <= set(names)
  assert sorted(dlcore.__all__) == names
  for name in names:
    assert inspect.ismodule(getattr(dlcore, name)), name


@pytest.mark.parametrize("name", MODULES)
def test_module_docstring(name):
  assert inspect.getdoc(_module(name)), f"{name} has no module docstring"


@pytest.mark.parametrize("name", MODULES)
def test_all_resolves_without_duplicates(name):
  module = _module(name)
  assert hasattr(module, "__all__"), f"{name} defines no __all__"
  public = module.__all__
  assert isinstance(public, (list, tuple)) and all(isinstance(n, str) for n in public), public
  duplicates = sorted(n for n, count in collections.Counter(public).items() if count > 1)
  assert not duplicates, f"{name}.__all__ lists {duplicates} more than once"
  missing = [n for n in public if n not in dir(module)]
  assert not missing, f"{name}.__all__ lists {missing}, which the module does not define"
  unresolved = []
  for n in public:
    try:
      getattr(module, n)
    except AttributeError:
      unresolved.append(n)
  assert not unresolved, f"{name}.__all__ lists {unresolved}, which do not resolve"


@pytest.mark.parametrize("name", MODULES)
def test_all_lists_every_public_definition(name):
  module = _module(name)
  unlisted = sorted(n for n, obj in vars(module).items()
                    if not n.startswith("_") and _is_api_object(obj)
                    and getattr(obj, "__module__", None) == name and n not in getattr(module, "__all__", ()))
  assert not unlisted, f"{name} defines {unlisted} but does not list them in __all__"


@pytest.mark.parametrize("name", MODULES)
def test_public_objects_documented(name):
  module = _module(name)
  undocumented = []
  for n in getattr(module, "__all__", ()):
    obj = getattr(module, n, None)
    if not _is_api_object(obj) or not str(getattr(obj, "__module__", "")).startswith("dlcore"):
      continue
    if not _own_doc(obj):
      undocumented.append(n)
    if inspect.isclass(obj):
      undocumented += [f"{n}.{m}" for m, fn in _public_methods(obj).items() if not _own_doc(fn)]
  assert not undocumented, f"{name}: no docstring on {sorted(undocumented)}"
