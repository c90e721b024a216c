"""Config files for every binary, in the flax-examples convention: `--config=FILE --config.group.key=value`.

FILE is a Python file whose `get_config()` returns a ConfigDict (experiments/configs/), a run's own
`config.json`, or that run's workdir (repeats it exactly). Whatever the source, the result is the binary's typed
schema (`configs.schema`) with the given values: a key outside the schema, a value of the wrong type, a missing
file, a syntax error, a file without `get_config` or a config.json written by another binary is a one-line error
naming the file and the key, raised while flags are parsed, before anything is read or written.
"""

import importlib.util
import json
import os
import sys
import traceback

from absl import flags
import ml_collections

from ml_collections.config_flags import config_flags as config_flags_impl

from . import configs
from .configs import schema

__all__ = ["CONFIG_DIR", "ConfigError", "define_config_flag", "flat", "load", "select", "to_json_dict"]

CONFIG_DIR = os.path.dirname(os.path.abspath(configs.__file__))


class ConfigError(ValueError):
  """A config that cannot be used; the message is one line naming the file and the key."""


def flat(config) -> dict:
  """{'group.key': value} of a (nested) ConfigDict or dict, tuples kept."""
  values = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
  out = {}
  for key, value in values.items():
    if isinstance(value, dict):
      out.update({f"{key}.{k}": v for k, v in flat(value).items()})
    else:
      out[key] = tuple(value) if isinstance(value, list) else value
  return out


def select(config, keys: dict[str, str]) -> dict:
  """{name: value of config key path} for a study's own names of its config keys ({'steps': 'loop.steps'})."""
  values = flat(config)
  return {name: values[path] for name, path in keys.items()}


def _merge(base: ml_collections.ConfigDict, values: dict, source: str, prefix: str = "") -> None:
  """Sets `values` into the schema `base`, key by key, refusing unknown keys and wrong types."""
  for key, value in values.items():
    path = f"{prefix}{key}"
    if key not in base:
      valid = ", ".join(f"{prefix}{k}" for k in sorted(base.keys()))
      raise ConfigError(f"{source}: unknown key {path!r}; valid keys here: {valid}")
    if isinstance(base[key], ml_collections.ConfigDict):
      if not isinstance(value, (dict, ml_collections.ConfigDict)):
        raise ConfigError(f"{source}: {path!r} is a group ({', '.join(sorted(base[key].keys()))}), got {value!r}")
      _merge(base[key], dict(value), source, f"{path}.")
      continue
    if isinstance(value, list):
      value = tuple(value)
    try:
      base[key] = value
    except TypeError:
      expected = type(base[key]).__name__ if base[key] is not None else "the schema's type"
      raise ConfigError(f"{source}: {path!r} must be {expected}, got {value!r}") from None


def _alias_package() -> None:
  """Config files import `dlcore_experiments.configs.schema`; from a clone that is not pip-installed, that
  name is this package (`experiments`)."""
  try:
    importlib.import_module("dlcore_experiments.configs.schema")
  except ImportError:
    sys.modules.setdefault("dlcore_experiments", sys.modules[__package__])
    sys.modules.setdefault("dlcore_experiments.configs", configs)
    sys.modules.setdefault("dlcore_experiments.configs.schema", schema)


def _from_python(path: str, binary: str) -> ml_collections.ConfigDict:
  _alias_package()
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path} does not exist")
  try:
    spec = importlib.util.spec_from_file_location(f"dlcore_config_{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"config file {path}: syntax error at line {e.lineno}: {e.msg}") from None
  except Exception as e:  # noqa: BLE001 - any error while importing the user's file, named in one line
    raise ConfigError(f"config file {path}: {type(e).__name__}: {e}") from None
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"config file {path} does not define get_config()")
  try:
    values = module.get_config()
  except Exception as e:  # noqa: BLE001
    where = traceback.extract_tb(sys.exc_info()[2])[-1]
    raise ConfigError(f"config file {path}: get_config() raised {type(e).__name__}: {e} "
                      f"(line {where.lineno})") from None
  if not isinstance(values, (dict, ml_collections.ConfigDict)):
    raise ConfigError(f"config file {path}: get_config() must return a ConfigDict, got {type(values).__name__}")
  config = schema.SCHEMAS[binary]()
  _merge(config, values.to_dict() if isinstance(values, ml_collections.ConfigDict) else values,
         f"config file {path}")
  return config


def _from_json(path: str, binary: str) -> ml_collections.ConfigDict:
  try:
    with open(path) as f:
      values = json.load(f)
  except OSError as e:
    raise ConfigError(f"config file {path}: {e.strerror}") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
  if not isinstance(values, dict) or "binary" not in values:
    raise ConfigError(f"config file {path} is not a dlcore run's config.json (no 'binary' key)")
  written_by = values.pop("binary")
  if written_by != binary:
    raise ConfigError(f"config file {path} was written by the {written_by} binary, not {binary}")
  config = schema.SCHEMAS[binary]()
  _merge(config, values, f"config file {path}")
  return config


def load(path: str, binary: str) -> ml_collections.ConfigDict:
  """The `binary`'s config from `path`: a .py config file, a run's config.json, or a run's workdir."""
  if binary not in schema.SCHEMAS:
    raise ValueError(f"unknown binary {binary!r}; valid: {', '.join(schema.SCHEMAS)}")
  if not path:
    raise ConfigError("--config is empty; give a config file, a run's config.json or its workdir")
  if os.path.isdir(path):
    json_path = os.path.join(path, "config.json")
    if not os.path.isfile(json_path):
      raise ConfigError(f"--config {path} is a folder without config.json (not a run's workdir)")
    return _from_json(json_path, binary)
  return _from_json(path, binary) if path.endswith(".json") else _from_python(path, binary)


def to_json_dict(config: ml_collections.ConfigDict, binary: str) -> dict:
  """What a run writes as config.json: `load` reads it back as the same config."""
  return {"binary": binary, **config.to_dict()}


class _Parser(config_flags_impl.ConfigFileFlagParser):
  """ml_collections' config-file parser, extended to config.json and workdirs, with one-line errors."""

  def __init__(self, binary: str):
    super().__init__(name="config", lock_config=True)
    self.binary = binary

  def parse(self, path):
    config = load(path, self.binary)  # a ValueError here becomes absl's one-line flag error
    config.lock()
    return config


class _Flag(config_flags_impl._ConfigFlag):
  """ml_collections' config flag, with an override of a key outside the schema reported in one line."""

  def _set_default(self, default):
    # The default file is parsed (with the command line's overrides) when the flag is defined, outside absl's
    # error handling: report a bad config the way absl reports a bad flag, in one line.
    try:
      super()._set_default(default)
    except (flags.Error, ValueError, TypeError) as e:
      sys.exit(f"FATAL Flags parsing error: {e}")

  def _parse(self, argument):
    try:
      return super()._parse(argument)
    except (KeyError, AttributeError, TypeError):
      config = self.parser.parse(argument)
      for override in self._GetOverrides(self._GetArgv()):
        node, walked = config, []
        for part in override.split("."):
          if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            prefix = ".".join(walked)
            keys = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            valid = ", ".join(f"{prefix + '.' if prefix else ''}{k}" for k in keys) or f"none ({prefix} is a value)"
            raise flags.IllegalFlagValueError(
                f"--config.{override}: no key {'.'.join(walked + [part])!r} in the {self.parser.binary} config; "
                f"valid keys here: {valid}") from None
          node, walked = node[part], walked + [part]
      raise


def define_config_flag(binary: str, default_file: str) -> flags.FlagHolder:
  """Defines `--config` (default: experiments/configs/`default_file`) with `--config.group.key=value` overrides."""
  parser = _Parser(binary)
  flag = _Flag(  # DEFINE_config_file's flag, with our parser
      parser=parser, serializer=flags.ArgumentSerializer(), name="config",
      default=os.path.join(CONFIG_DIR, default_file),
      help_string=(f"Config: a Python file defining get_config() (default: experiments/configs/{default_file}), "
                   "a run's config.json or its workdir (repeats it); override keys with --config.group.key=value."),
      flag_values=flags.FLAGS, accept_new_attributes=False)
  return flags.DEFINE_flag(flag, flags.FLAGS)
