"""Settings precedence: flag > environment > config file > default (DESIGN §7).

Config files: /etc/xctl/xctl.yaml, then ~/.config/xctl/xctl.yaml (the later overrides the
earlier). Keys: aggregator, timeout, keys, node.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Final

import yaml

from xctl.core.errors import ConfigError

DEFAULT_AGGREGATOR: Final = "127.0.0.1:7400"
DEFAULT_TIMEOUT_S: Final = 5.0
_KEYS: Final = frozenset({"aggregator", "timeout", "keys", "node"})
_ENV: Final = {"aggregator": "XCTL_AGGREGATOR", "timeout": "XCTL_TIMEOUT", "keys": "XCTL_KEYS", "node": "XCTL_NODE"}


def config_paths() -> list[Path]:
    paths = [Path("/etc/xctl/xctl.yaml")]
    override = os.environ.get("XCTL_CONFIG")
    if override:
        return [Path(override)]
    paths.append(Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "xctl" / "xctl.yaml")
    return paths


def load_file_settings() -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for path in config_paths():
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of settings ({', '.join(sorted(_KEYS))})")
        unknown = set(data) - _KEYS
        if unknown:
            raise ConfigError(f"{path}: unknown setting(s) {', '.join(sorted(map(str, unknown)))}")
        merged.update(data)
    return merged


def resolve(name: str, flag: Any, default: Any) -> Any:
    """The effective value of one setting."""
    if flag is not None:
        return flag
    env = os.environ.get(_ENV[name])
    if env:
        return env
    file_value = load_file_settings().get(name)
    return default if file_value is None else file_value
