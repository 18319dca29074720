"""County overrides: one county file layered on the shared state baseline, every line attributable.

The baseline is ``policies/policy.csv``; a county may add one override file (setting
``policy_override_file``). Its rule lines are added to the baseline. Because any deny overrides
any allow, an added deny narrows the baseline and an added allow widens it only where no
baseline deny applies. A baseline decision rule is removed only by an explicit line

    # remove: <role>, <category>, <purpose>, <ground>, <effect>

which must name exactly one ``p`` rule of the baseline (a removal that matches nothing is an
error, so a typo cannot silently leave a rule in force). See docs/policy-layers.md.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from broker.policy.errors import PolicyError
from broker.policy.rules import GROUPING, PolicyRule, _check_groupings, _check_p, _parse
from broker.vocabulary import Vocabulary

OVERRIDE_PREFIX = "override/"
"""Key prefix of the override file in ``engine.files()`` and the version hash."""

REMOVE_FIELDS = ("role", "category", "purpose", "ground", "effect")
_REMOVE = re.compile(r"^#\s*remove\s*:(?P<rest>.*)$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class LayeredRule(PolicyRule):
    """A rule with the file it came from (``policy.csv`` or the override file's name)."""

    file: str = "policy.csv"

    @property
    def location(self) -> str:
        """``file:line`` for messages and explanations."""
        return f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True)
class Removal:
    """One ``# remove:`` line: the baseline rule (first five p fields) it takes out."""

    key: tuple[str, ...]
    line: int


@dataclass(frozen=True, slots=True)
class Override:
    """A parsed county override file, before it is merged."""

    path: Path
    data: bytes
    rules: tuple[PolicyRule, ...]
    removals: tuple[Removal, ...]

    @property
    def files_key(self) -> str:
        """The name under which the override is hashed into the policy version."""
        return OVERRIDE_PREFIX + self.path.name


def read_override(path: Path) -> Override:
    """Read and parse the override file (rules and removals), without validating terms yet."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PolicyError(path, None, f"cannot read the override file ({type(exc).__name__})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(path, None, "not valid UTF-8") from None
    return Override(path=path, data=data, rules=tuple(_parse(path, text)), removals=tuple(_removals(path, text)))


def merge(baseline_path: Path, baseline: tuple[PolicyRule, ...], override: Override,
          vocabulary: Vocabulary) -> tuple[LayeredRule, ...]:
    """Baseline minus removals plus override rules; override defects name the override file and line."""
    path = override.path
    index = {r.fields[:5]: r for r in baseline if r.ptype == "p"}
    removed: dict[tuple[str, ...], int] = {}
    for removal in override.removals:
        if removal.key in removed:
            raise PolicyError(path, removal.line, f"duplicate of the removal on line {removed[removal.key]}")
        if removal.key not in index:
            raise PolicyError(path, removal.line, f"removes no rule: {baseline_path.name} has no p rule "
                                                  f"{', '.join(removal.key)}")
        removed[removal.key] = removal.line
    kept = [r for r in baseline if not (r.ptype == "p" and r.fields[:5] in removed)]
    groupings = [r for r in kept if r.ptype in GROUPING]
    groups = _check_groupings(path, tuple(groupings + [r for r in override.rules if r.ptype in GROUPING]),
                              vocabulary)
    seen = {(r.ptype, *r.fields): r for r in kept}
    mine: dict[tuple[str, ...], int] = {}
    for rule in override.rules:
        key = (rule.ptype, *rule.fields)
        if key in mine:
            raise PolicyError(path, rule.line, f"duplicate of the rule on line {mine[key]}")
        if key in seen:
            raise PolicyError(path, rule.line, f"duplicate of {baseline_path.name}:{seen[key].line} "
                                               "(the baseline already has this rule)")
        mine[key] = rule.line
        if rule.ptype == "p":
            _check_p(path, rule, vocabulary, groups)
    base_name = baseline_path.name
    return (tuple(LayeredRule(r.ptype, r.fields, r.line, base_name) for r in kept)
            + tuple(LayeredRule(r.ptype, r.fields, r.line, path.name) for r in override.rules))


def _removals(path: Path, text: str):
    """Yield one Removal per ``# remove:`` comment line."""
    for number, raw in enumerate(text.splitlines(), start=1):
        match = _REMOVE.match(raw.strip())
        if match is None:
            continue
        try:
            tokens = next(csv.reader([match["rest"].strip()], skipinitialspace=True, strict=True), [])
        except csv.Error as exc:
            raise PolicyError(path, number, f"malformed removal ({exc})") from None
        tokens = [t.strip() for t in tokens]
        if len(tokens) != len(REMOVE_FIELDS) or not all(tokens):
            raise PolicyError(path, number, f"a removal needs {len(REMOVE_FIELDS)} fields "
                                            f"({', '.join(REMOVE_FIELDS)}); found {len(tokens)}")
        yield Removal(key=tuple(tokens), line=number)
