"""The rule schema: vocabularies, expected-value matchers, condition trees, templates, rules.

Parsing collects every problem of a file (each with its line) instead of stopping at the
first, so ``xctl rules lint`` shows them all at once. See docs/rules.md for the schema.
"""

from __future__ import annotations

import difflib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from xctl.rules._yaml import LineList, LineMap, RuleFileError
from xctl.rules.facts import FACTS, FAMILIES, Facts, FactValue, is_known_fact

SCHEMA_VERSION: Final = 1

#: Ordered from least to most severe; ties between equally specific rules go to the more severe.
SEVERITIES: Final = ("info", "warning", "critical", "fatal")
SEVERITY_RANK: Final[dict[str, int]] = {s: i for i, s in enumerate(SEVERITIES)}

#: Scene analyzers of the original design, plus NodeDown, Thermal, Power and Interconnect.
SCENES: Final = (
    "GpuOom",
    "GpuUtilLow",
    "GpuError",
    "Thermal",
    "Power",
    "Interconnect",
    "NetworkStall",
    "NetworkDrop",
    "StorageIoError",
    "StorageSlow",
    "ProcessBlocked",
    "ProcessCrash",
    "NodeDown",
)

#: Action buckets. The first group is NVIDIA's XID catalogue vocabulary (resolution buckets and
#: the XID 154 recovery actions); the rest name where to look for non-GPU causes.
ACTIONS: Final[dict[str, str]] = {
    "IGNORE": "no action needed: informational, or already handled",
    "RESTART_APP": "restart the application (job); the GPU is fine",
    "CHECK_APP": "the application is at fault: debug it (compute-sanitizer, logs, stack dumps)",
    "RESET_GPU": "drain the GPU's work and reset it (nvidia-smi -r)",
    "DRAIN_P2P": "stop peer-to-peer traffic to the GPU, then continue",
    "DRAIN_AND_RESET": "drain the node's jobs, then reset the GPU(s)",
    "RESTART_VM": "restart the virtual machine",
    "RESTART_BM": "drain and reboot the bare-metal node (a GPU reset is not enough)",
    "UPDATE_SW": "update the driver, firmware or software stack",
    "CHECK_MECHANICALS": "inspect cabling, seating, risers and connectors",
    "CONTACT_SUPPORT": "open a case with the vendor; likely RMA",
    "CHECK_COOLING": "check fans, airflow, inlet temperature and the cooling loop",
    "CHECK_POWER": "check PSUs, power feeds and rack power capping",
    "CHECK_NETWORK": "check the NIC, cable, switch port and fabric",
    "CHECK_STORAGE": "check the storage device or filesystem",
    "CHECK_NODE": "check the node itself (BMC, console, kernel)",
    "CHECK_CONFIG": "a configuration or an operator's setting causes it: review it",
}
#: Site-specific actions are accepted when prefixed ``SITE_`` (e.g. SITE_OPEN_TICKET).
SITE_ACTION: Final = re.compile(r"^SITE_[A-Z0-9_]{1,60}$")
RULE_ID: Final = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")
MAX_REGEX: Final = 512

RULE_KEYS: Final = (
    "id",
    "scene",
    "severity",
    "priority",
    "description",
    "conditions",
    "summary",
    "action",
    "steps",
    "references",
)
COMPARISONS: Final = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in", "re", "exists")

Scalar = str | int | float | bool


class Problems:
    """Collects located problems while parsing one file."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[RuleFileError] = []

    def add(self, line: int | None, detail: str) -> None:
        self.items.append(RuleFileError(self.source, line, detail))

    def __bool__(self) -> bool:
        return bool(self.items)

    def __len__(self) -> int:
        return len(self.items)


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _show(value: object) -> str:
    if isinstance(value, LineMap):
        return "a mapping"
    if isinstance(value, LineList):
        return "a list"
    if value is None:
        return "null"
    return f"{type(value).__name__} {value!r}"


# ---------------------------------------------------------------------- matchers
def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _scalar_text(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def scalar_equal(expected: Scalar, value: Scalar) -> bool:
    """Booleans equal only booleans; numbers (and numeric strings) compare numerically."""
    if isinstance(expected, bool) or isinstance(value, bool):
        return isinstance(expected, bool) and isinstance(value, bool) and expected == value
    if isinstance(expected, str) and isinstance(value, str):
        return expected == value
    left, right = _number(expected), _number(value)
    if left is not None and right is not None:
        return left == right
    return _scalar_text(expected) == _scalar_text(value)


class Matcher(ABC):
    """One expected value. ``test(None)`` asks about a missing fact."""

    __slots__ = ()

    @abstractmethod
    def test(self, value: FactValue | None) -> bool: ...

    @abstractmethod
    def describe(self) -> str: ...


class Exact(Matcher):
    __slots__ = ("expected",)

    def __init__(self, expected: Scalar) -> None:
        self.expected = expected

    def test(self, value: FactValue | None) -> bool:
        if value is None:
            return False
        if isinstance(value, tuple):
            return any(scalar_equal(self.expected, v) for v in value)
        return scalar_equal(self.expected, value)

    def describe(self) -> str:
        return repr(self.expected)


class Regex(Matcher):
    __slots__ = ("pattern",)

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self.pattern = pattern

    def test(self, value: FactValue | None) -> bool:
        if value is None:
            return False
        if isinstance(value, tuple):
            return any(self.pattern.search(v) for v in value)
        return self.pattern.search(_scalar_text(value)) is not None

    def describe(self) -> str:
        return f"re:{self.pattern.pattern}"


class Missing(Matcher):
    """``null``: the fact is missing."""

    __slots__ = ()

    def test(self, value: FactValue | None) -> bool:
        return value is None

    def describe(self) -> str:
        return "null"


class AnyOf(Matcher):
    __slots__ = ("options",)

    def __init__(self, options: tuple[Matcher, ...]) -> None:
        self.options = options

    def test(self, value: FactValue | None) -> bool:
        return any(o.test(value) for o in self.options)

    def describe(self) -> str:
        return "[" + ", ".join(o.describe() for o in self.options) + "]"


class Compare(Matcher):
    """``{gte: 2, lt: 10}``: every comparison must hold. On a list fact the numeric
    comparisons apply to its length; ``in``/``not_in``/``re``/``eq``/``ne`` to its elements."""

    __slots__ = ("ops",)

    def __init__(self, ops: tuple[tuple[str, Any], ...]) -> None:
        self.ops = ops

    def test(self, value: FactValue | None) -> bool:
        return all(self._one(op, operand, value) for op, operand in self.ops)

    @staticmethod
    def _one(op: str, operand: Any, value: FactValue | None) -> bool:
        if op == "exists":
            return (value is not None) is operand
        if value is None:
            return False
        items: tuple[Scalar, ...] = value if isinstance(value, tuple) else (value,)
        if op in ("gt", "gte", "lt", "lte"):
            number = float(len(value)) if isinstance(value, tuple) else _number(value)
            if number is None:
                return False
            bound = float(operand)
            if op == "gt":
                return number > bound
            if op == "gte":
                return number >= bound
            if op == "lt":
                return number < bound
            return number <= bound
        if op == "eq":
            return any(scalar_equal(operand, v) for v in items)
        if op == "ne":
            return not any(scalar_equal(operand, v) for v in items)
        if op == "in":
            return any(scalar_equal(o, v) for o in operand for v in items)
        if op == "not_in":
            return not any(scalar_equal(o, v) for o in operand for v in items)
        if op == "re":
            pattern: re.Pattern[str] = operand
            return any(pattern.search(_scalar_text(v)) for v in items)
        return False

    def describe(self) -> str:
        parts = []
        for op, operand in self.ops:
            shown = f"re:{operand.pattern}" if isinstance(operand, re.Pattern) else repr(operand)
            parts.append(f"{op}: {shown}")
        return "{" + ", ".join(parts) + "}"


# ---------------------------------------------------------------------- conditions
class Condition(ABC):
    """A node of a condition tree. ``evaluate`` returns the specificity of a match, or None."""

    __slots__ = ()

    @abstractmethod
    def evaluate(self, facts: Facts) -> int | None: ...

    @abstractmethod
    def leaves(self) -> Iterator[Leaf]: ...


class Leaf(Condition):
    __slots__ = ("fact", "line", "matcher")

    def __init__(self, fact: str, matcher: Matcher, line: int | None) -> None:
        self.fact = fact
        self.matcher = matcher
        self.line = line

    def evaluate(self, facts: Facts) -> int | None:
        return 1 if self.matcher.test(facts.get(self.fact)) else None

    def leaves(self) -> Iterator[Leaf]:
        yield self

    def describe(self) -> str:
        """``root.code: re:^XID_(48|63)$`` — the leaf as written (normalised)."""
        return f"{self.fact}: {self.matcher.describe()}"

    def __repr__(self) -> str:
        return self.describe()


class AllOf(Condition):
    """Every child holds; specificity is the sum of the children's."""

    __slots__ = ("children",)

    def __init__(self, children: tuple[Condition, ...]) -> None:
        self.children = children

    def evaluate(self, facts: Facts) -> int | None:
        total = 0
        for child in self.children:
            score = child.evaluate(facts)
            if score is None:
                return None
            total += score
        return total

    def leaves(self) -> Iterator[Leaf]:
        for child in self.children:
            yield from child.leaves()


class AnyOfConditions(Condition):
    """At least one child holds; specificity is the best holding child's."""

    __slots__ = ("children",)

    def __init__(self, children: tuple[Condition, ...]) -> None:
        self.children = children

    def evaluate(self, facts: Facts) -> int | None:
        best: int | None = None
        for child in self.children:
            score = child.evaluate(facts)
            if score is not None and (best is None or score > best):
                best = score
        return best

    def leaves(self) -> Iterator[Leaf]:
        for child in self.children:
            yield from child.leaves()


class NotCondition(Condition):
    """The child does not hold; a holding negation counts as one condition."""

    __slots__ = ("child",)

    def __init__(self, child: Condition) -> None:
        self.child = child

    def evaluate(self, facts: Facts) -> int | None:
        return 1 if self.child.evaluate(facts) is None else None

    def leaves(self) -> Iterator[Leaf]:
        yield from self.child.leaves()


# ---------------------------------------------------------------------- templates
_TOKEN: Final = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


@dataclass(frozen=True, slots=True)
class Template:
    """``"{root.code} on {root.node}/{root.entity}"``: placeholders name facts, with an
    optional format spec (``{root.age_s:.0f}``); ``{{`` and ``}}`` are literal braces. A
    missing fact renders as ``?`` and a spec that does not fit the value is ignored."""

    text: str
    parts: tuple[str | tuple[str, str], ...]

    def render(self, facts: Facts) -> str:
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            name, spec = part
            out.append(render_value(facts.get(name), spec))
        return "".join(out)

    def facts(self) -> list[str]:
        return [p[0] for p in self.parts if not isinstance(p, str)]


def render_value(value: FactValue | None, spec: str = "") -> str:
    if value is None:
        return "?"
    if isinstance(value, tuple):
        return ", ".join(value) if value else "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if spec:
        try:
            return format(value, spec)
        except (ValueError, TypeError):
            pass
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def parse_template(text: str, line: int | None, problems: Problems, what: str) -> Template:
    parts: list[str | tuple[str, str]] = []
    pos = 0
    for match in _TOKEN.finditer(text):
        if match.start() > pos:
            parts.append(text[pos : match.start()])
        token = match.group(0)
        if token in ("{{", "}}"):
            parts.append(token[0])
        elif match.group(1) is None:
            problems.add(line, f"{what}: unbalanced {token!r} (write {token}{token} for a literal brace)")
        else:
            name, _, spec = match.group(1).strip().partition(":")
            name = name.strip()
            if not is_known_fact(name):
                problems.add(line, f"{what}: unknown fact {{{name}}} in the template{_suggest(name, _fact_names())}")
            parts.append((name, spec))
        pos = match.end()
    if pos < len(text):
        parts.append(text[pos:])
    return Template(text, tuple(parts))


def _fact_names() -> list[str]:
    return [*FACTS, *(f"{prefix}CODE" for prefix in FAMILIES)]


# ---------------------------------------------------------------------- rules
@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    scene: str
    severity: str
    action: str
    summary: Template
    steps: tuple[Template, ...]
    conditions: Condition
    priority: int = 0
    description: str = ""
    references: tuple[str, ...] = ()
    source: str = ""
    line: int | None = None

    @property
    def severity_rank(self) -> int:
        return SEVERITY_RANK[self.severity]

    @property
    def location(self) -> str:
        return f"{self.source}:{self.line}" if self.line is not None else self.source

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "scene": self.scene,
            "severity": self.severity,
            "action": self.action,
            "source": self.source,
            "line": self.line,
            "priority": self.priority,
            "description": self.description,
        }


def parse_expected(value: Any, line: int | None, problems: Problems, where: str, *, nested: bool = False) -> Matcher:
    """One expected value: exact, ``re:...``, a list (any of), a comparison map, or null."""
    if value is None:
        return Missing()
    if isinstance(value, bool | int | float):
        return Exact(value)
    if isinstance(value, str):
        if value.startswith("re:"):
            pattern = _regex(value[3:], line, problems, where)
            return Regex(pattern) if pattern is not None else Missing()
        return Exact(value)
    if isinstance(value, LineList):
        if nested:
            problems.add(line, f"{where}: a list inside a list; write one flat list of alternatives")
            return Missing()
        if not value:
            problems.add(line, f"{where}: an empty list matches nothing")
            return Missing()
        return AnyOf(tuple(parse_expected(v, ln, problems, where, nested=True) for ln, v in value.numbered()))
    if isinstance(value, LineMap):
        return _comparison(value, problems, where)
    problems.add(line, f"{where}: expected a value, a list, re:PATTERN or a comparison map, got {_show(value)}")
    return Missing()


def _regex(text: str, line: int | None, problems: Problems, where: str) -> re.Pattern[str] | None:
    if len(text) > MAX_REGEX:
        problems.add(line, f"{where}: regular expression longer than {MAX_REGEX} characters")
        return None
    try:
        return re.compile(text)
    except re.error as exc:
        problems.add(line, f"{where}: bad regular expression {text!r}: {exc}")
        return None


def _comparison(value: LineMap, problems: Problems, where: str) -> Matcher:
    if not value:
        problems.add(value.line, f"{where}: an empty comparison map; use e.g. {{gte: 2}}")
        return Missing()
    ops: list[tuple[str, Any]] = []
    for op, given in value.items():
        operand: Any = given
        line = value.line_of(op)
        if op not in COMPARISONS:
            problems.add(line, f"{where}: unknown comparison {op!r}{_suggest(str(op), COMPARISONS)}; "
                         f"use one of {', '.join(COMPARISONS)}")
            continue
        if op in ("gt", "gte", "lt", "lte"):
            if isinstance(operand, bool) or not isinstance(operand, int | float):
                problems.add(line, f"{where}: {op} needs a number, got {_show(operand)}")
                continue
        elif op in ("eq", "ne"):
            if not isinstance(operand, str | int | float | bool):
                problems.add(line, f"{where}: {op} needs a single value, got {_show(operand)}")
                continue
        elif op in ("in", "not_in"):
            if not isinstance(operand, LineList) or not all(isinstance(o, str | int | float | bool) for o in operand):
                problems.add(line, f"{where}: {op} needs a list of values, got {_show(operand)}")
                continue
            operand = tuple(operand)
        elif op == "re":
            if not isinstance(operand, str):
                problems.add(line, f"{where}: re needs a string pattern, got {_show(operand)}")
                continue
            operand = _regex(operand, line, problems, where)
            if operand is None:
                continue
        elif op == "exists" and not isinstance(operand, bool):
            problems.add(line, f"{where}: exists needs true or false, got {_show(operand)}")
            continue
        ops.append((op, operand))
    return Compare(tuple(ops)) if ops else Missing()


def parse_conditions(value: Any, line: int | None, problems: Problems) -> Condition | None:
    """``conditions:``: a list (all must hold), a mapping of facts, or all/any/not trees."""
    if value is None or (isinstance(value, LineList | LineMap) and not value):
        problems.add(line, "conditions: required, with at least one condition (a rule that matches "
                     "everything is almost always a mistake)")
        return None
    before = len(problems)
    cond = _node(value, line, problems, "conditions")
    if cond is None or len(problems) > before:
        return None
    return cond


def _node(value: Any, line: int | None, problems: Problems, where: str) -> Condition | None:
    if isinstance(value, LineList):
        if not value:
            problems.add(line, f"{where}: an empty list")
            return None
        children = [_node(item, ln, problems, where) for ln, item in value.numbered()]
        kept = tuple(c for c in children if c is not None)
        return kept[0] if len(kept) == 1 else AllOf(kept)
    if isinstance(value, LineMap):
        return _mapping(value, problems, where)
    problems.add(line, f"{where}: each condition is `fact: expected` or an all:/any:/not: block, got {_show(value)}")
    return None


def _mapping(value: LineMap, problems: Problems, where: str) -> Condition | None:
    if not value:
        problems.add(value.line, f"{where}: an empty mapping")
        return None
    parts: list[Condition] = []
    for key, child in value.items():
        line = value.line_of(key)
        if key in ("all", "any", "not"):
            if not isinstance(child, LineList | LineMap) or not child:
                problems.add(line, f"{where}: {key}: needs a non-empty list or mapping of conditions")
                continue
            if key == "any" and isinstance(child, LineList):
                kids = [_node(item, ln, problems, f"{where}.any") for ln, item in child.numbered()]
                parts.append(AnyOfConditions(tuple(k for k in kids if k is not None)))
            elif key == "any":
                assert isinstance(child, LineMap)
                kids = [_leaf(k, v, child.line_of(k), problems, f"{where}.any") for k, v in child.items()]
                parts.append(AnyOfConditions(tuple(k for k in kids if k is not None)))
            else:
                node = _node(child, line, problems, f"{where}.{key}")
                if node is not None:
                    parts.append(NotCondition(node) if key == "not" else node)
            continue
        leaf = _leaf(key, child, line, problems, where)
        if leaf is not None:
            parts.append(leaf)
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else AllOf(tuple(parts))


def _leaf(key: Any, value: Any, line: int | None, problems: Problems, where: str) -> Condition | None:
    if key in ("all", "any", "not"):
        return _mapping(_single(key, value, line), problems, where)
    if not isinstance(key, str):
        problems.add(line, f"{where}: a fact name must be a string, got {_show(key)}")
        return None
    if not is_known_fact(key):
        problems.add(line, f"{where}: unknown fact {key!r}{_suggest(key, _fact_names())} (see docs/rules.md)")
        return None
    return Leaf(key, parse_expected(value, line, problems, key), line)


def _single(key: str, value: Any, line: int | None) -> LineMap:
    out = LineMap()
    out.line = line or 0
    out[key] = value
    out.key_lines[key] = line or 0
    return out


def parse_rule(value: Any, line: int | None, problems: Problems) -> Rule | None:
    """One rule mapping → a Rule, or None (problems recorded)."""
    if not isinstance(value, LineMap):
        problems.add(line, f"a rule must be a mapping with id, scene, severity, conditions, summary, action, "
                     f"steps; got {_show(value)}")
        return None
    before = len(problems)
    line = value.line
    for key in value:
        if key in RULE_KEYS or (isinstance(key, str) and key.startswith("x-")):
            continue
        problems.add(value.line_of(key), f"unknown rule key {key!r}{_suggest(str(key), RULE_KEYS)}")
    rid = value.get("id")
    label = f"rule {rid!r}" if isinstance(rid, str) else "rule"
    if rid is None:
        problems.add(line, "rule: missing id")
    elif not isinstance(rid, str) or not RULE_ID.match(rid):
        problems.add(value.line_of("id"), f"id: {rid!r} is not a valid rule id (lowercase letters, digits, "
                     "'.', '_' and '-', starting with a letter or digit)")
    scene = _choice(value, "scene", SCENES, problems, label)
    severity = _choice(value, "severity", SEVERITIES, problems, label)
    action = value.get("action")
    if action is None:
        problems.add(line, f"{label}: missing action")
    elif not isinstance(action, str) or (action not in ACTIONS and not SITE_ACTION.match(action)):
        problems.add(value.line_of("action"), f"{label}: unknown action {action!r}{_suggest(str(action), ACTIONS)}; "
                     f"use one of {', '.join(ACTIONS)} or SITE_<NAME>")
    priority = value.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int) or not -1000 <= priority <= 1000:
        problems.add(value.line_of("priority"), f"{label}: priority must be an integer from -1000 to 1000")
        priority = 0
    description = value.get("description", "")
    if not isinstance(description, str):
        problems.add(value.line_of("description"), f"{label}: description must be a string")
    summary_text = value.get("summary")
    summary = Template("", ())
    if summary_text is None:
        problems.add(line, f"{label}: missing summary")
    elif not isinstance(summary_text, str) or not summary_text.strip():
        problems.add(value.line_of("summary"), f"{label}: summary must be a non-empty string")
    else:
        summary = parse_template(summary_text, value.line_of("summary"), problems, f"{label} summary")
    steps = _strings(value, "steps", problems, label, required=True)
    references = _strings(value, "references", problems, label, required=False)
    conditions = None
    if "conditions" not in value:
        problems.add(line, f"{label}: missing conditions")
    else:
        conditions = parse_conditions(value["conditions"], value.line_of("conditions"), problems)
    if len(problems) > before or conditions is None:
        return None
    assert isinstance(rid, str)
    assert isinstance(action, str)
    assert isinstance(description, str)
    assert scene is not None
    assert severity is not None
    step_templates = tuple(
        parse_template(text, ln, problems, f"{label} step") for ln, text in steps
    )
    if len(problems) > before:
        return None
    return Rule(
        id=rid,
        scene=scene,
        severity=severity,
        action=action,
        summary=summary,
        steps=step_templates,
        conditions=conditions,
        priority=priority,
        description=description.strip(),
        references=tuple(text for _, text in references),
        source=problems.source,
        line=line,
    )


def _choice(value: LineMap, key: str, choices: tuple[str, ...], problems: Problems, label: str) -> str | None:
    got = value.get(key)
    if got is None:
        problems.add(value.line, f"{label}: missing {key}")
        return None
    if not isinstance(got, str) or got not in choices:
        problems.add(value.line_of(key), f"{label}: unknown {key} {got!r}{_suggest(str(got), choices)}; "
                     f"use one of {', '.join(choices)}")
        return None
    return got


def _strings(value: LineMap, key: str, problems: Problems, label: str, *, required: bool) -> list[tuple[int, str]]:
    got = value.get(key)
    if got is None:
        if required:
            problems.add(value.line, f"{label}: missing {key} (a list of strings)")
        return []
    if isinstance(got, str):
        return [(value.line_of(key), got)]
    if not isinstance(got, LineList) or (required and not got):
        problems.add(value.line_of(key), f"{label}: {key} must be a non-empty list of strings")
        return []
    out: list[tuple[int, str]] = []
    for ln, item in got.numbered():
        if not isinstance(item, str) or not item.strip():
            problems.add(ln, f"{label}: each of {key} must be a non-empty string, got {_show(item)}")
        else:
            out.append((ln, item))
    return out


# ---------------------------------------------------------------------- files
def file_kind(data: Any) -> str:
    """``rules`` (a rule file), ``cases`` (a rule-test file) or ``unknown``."""
    if isinstance(data, LineList):
        return "rules"
    if isinstance(data, LineMap):
        if "rules" in data:
            return "rules"
        if "cases" in data or "expect" in data:
            return "cases"
    return "unknown"


def parse_rule_file(data: Any, source: str) -> tuple[list[Rule], list[RuleFileError]]:
    """A parsed rule file → (rules, problems). A top-level list of rules, or ``rules:`` with an
    optional ``version: 1``. Any problem makes the caller skip the whole file."""
    problems = Problems(source)
    items: Any
    line: int | None
    if data is None:
        problems.add(None, "empty file: expected a `rules:` list")
        return [], problems.items
    if isinstance(data, LineMap):
        for key in data:
            if key not in ("rules", "version") and not (isinstance(key, str) and key.startswith("x-")):
                problems.add(data.line_of(key), f"unknown top-level key {key!r}: a rule file holds `rules:` "
                             "(and optionally `version: 1`)")
        version = data.get("version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            problems.add(data.line_of("version"), f"version: {version!r} is not supported (this xctl reads "
                         f"version {SCHEMA_VERSION})")
        items = data.get("rules")
        line = data.line_of("rules")
    else:
        items, line = data, (data.line if isinstance(data, LineList) else None)
    if not isinstance(items, LineList):
        problems.add(line, f"rules: expected a list of rules, got {_show(items)}")
        return [], problems.items
    rules: list[Rule] = []
    seen: dict[str, int | None] = {}
    for item_line, item in items.numbered():
        rule = parse_rule(item, item_line, problems)
        if rule is None:
            continue
        if rule.id in seen:
            problems.add(rule.line, f"duplicate rule id {rule.id!r} (first on line {seen[rule.id]})")
            continue
        seen[rule.id] = rule.line
        rules.append(rule)
    return rules, sorted(problems.items, key=lambda e: e.line or 0)
