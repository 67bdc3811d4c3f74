"""YAML with line numbers: every mapping and list remembers where it (and each entry) starts.

Only ``yaml.SafeLoader`` is used. Mappings become :class:`LineMap` (a dict with ``line`` and
``key_lines``), sequences :class:`LineList` (a list with ``line`` and ``item_lines``); scalars
stay plain Python values, located through their parent. Duplicate keys — which YAML would
silently collapse, losing a condition — are an error with the line of the second key.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from pathlib import Path
from typing import Any, Final

import yaml

from xctl.core.errors import RuleError

#: Refuse rule or case files larger than this (they are hand-written YAML).
MAX_FILE_BYTES: Final = 1024 * 1024


class RuleFileError(RuleError):
    """A rule or rule-test file problem, located: ``path:line: detail``."""

    def __init__(self, path: str, line: int | None, detail: str) -> None:
        self.path = path
        self.line = line
        self.detail = detail
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {detail}")

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "line": self.line, "message": self.detail}


class LineMap(dict[Any, Any]):
    """A mapping that knows its own line and the line of each key (1-based)."""

    line: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.key_lines: dict[Any, int] = {}

    def line_of(self, key: Any) -> int:
        return self.key_lines.get(key, self.line)


class LineList(list[Any]):
    """A sequence that knows its own line and the line of each item (1-based)."""

    line: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.item_lines: list[int] = []

    def line_of(self, index: int) -> int:
        return self.item_lines[index] if 0 <= index < len(self.item_lines) else self.line

    def numbered(self) -> Iterator[tuple[int, Any]]:
        """(line, item) pairs."""
        for index, item in enumerate(self):
            yield self.line_of(index), item


class _DuplicateKeyError(yaml.MarkedYAMLError):
    pass


#: libyaml's parser when PyYAML was built with it (several times faster), else the pure one.
_SafeBase: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _LineLoader(_SafeBase):  # type: ignore[valid-type, misc]
    """A safe loader whose mappings and sequences carry line numbers."""


def _construct_map(loader: _LineLoader, node: yaml.MappingNode) -> Iterator[LineMap]:
    data = LineMap()
    data.line = node.start_mark.line + 1
    yield data
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):
            raise _DuplicateKeyError(
                "while constructing a mapping", node.start_mark, "found an unhashable key", key_node.start_mark
            )
        if key in data:
            raise _DuplicateKeyError(
                "while constructing a mapping",
                node.start_mark,
                f"duplicate key {key!r} (first on line {data.key_lines[key]})",
                key_node.start_mark,
            )
        data[key] = loader.construct_object(value_node, deep=True)
        data.key_lines[key] = key_node.start_mark.line + 1


def _construct_seq(loader: _LineLoader, node: yaml.SequenceNode) -> Iterator[LineList]:
    data = LineList()
    data.line = node.start_mark.line + 1
    yield data
    for child in node.value:
        data.append(loader.construct_object(child, deep=True))
        data.item_lines.append(child.start_mark.line + 1)


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


def parse_yaml(text: str, source: str) -> Any:
    """Parse one YAML document; syntax errors become :class:`RuleFileError` with the line."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise RuleFileError(source, None, f"file larger than {MAX_FILE_BYTES} bytes")
    try:
        return yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a safe loader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise RuleFileError(source, line, f"invalid YAML: {problem}") from exc
    except yaml.YAMLError as exc:
        raise RuleFileError(source, None, f"invalid YAML: {exc}") from exc
    except RecursionError as exc:
        raise RuleFileError(source, None, "invalid YAML: nested too deeply") from exc


def read_yaml(path: Path, source: str | None = None) -> Any:
    """Read and parse a file; I/O and decoding errors become :class:`RuleFileError`."""
    name = source or str(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise RuleFileError(name, None, f"file larger than {MAX_FILE_BYTES} bytes ({size})")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RuleFileError(name, None, f"cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise RuleFileError(name, None, "not UTF-8 text") from exc
    return parse_yaml(text, name)


def line_of(container: Any, key: Any = None) -> int | None:
    """Best-effort line of ``container[key]`` (or the container itself)."""
    if isinstance(container, LineMap):
        return container.line_of(key) if key is not None else container.line
    if isinstance(container, LineList):
        return container.line_of(key) if isinstance(key, int) else container.line
    return None
