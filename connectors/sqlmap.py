"""Mapping files for the SQL connector: which rows make which FHIR R4 resources.

A mapping file is YAML with a list of ``records``. Each record names one query (a ``table`` or
a ``query`` without parameters), the ``columns`` it returns with their types, the column that
holds the source's youth id, the resource id template (``prefix{key_column}``), the record's
data categories, and a resource template: a FHIR JSON skeleton whose strings may hold
``{column}`` placeholders. Rules of the template (docs/connectors.md has the whole format):

- a string that is exactly one placeholder takes the column's value with its JSON type;
  placeholders inside longer strings are substituted as text;
- a NULL (or empty string) column omits the element that holds it, and an object or list
  left without any column data is omitted too, with its static parts (codings, labels);
- ``$label: <category>`` on an object adds the HL7 DS4P inline security label extension to
  that element, so the broker can redact it without dropping the whole resource.

The loader checks everything it can without a database: unknown keys, resource types,
categories, columns and elements (a sample row is rendered and validated with fhir.resources),
and raises ``ValueError`` naming the file and record, never any record content.
The connector filters by the patient column and reads by the key column with bound parameters;
nothing from a request is ever formatted into SQL.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import (Boolean, Date, DateTime, Float, Integer, Select, String, bindparam, column, select, table,
                        text)
from sqlalchemy.types import TypeEngine

from connectors.classify import LOCAL_CATEGORY_SYSTEM

INLINE_LABEL_URL = "http://hl7.org/fhir/uv/security-label-ds4p/StructureDefinition/extension-inline-sec-label"
MAPPINGS_DIR = Path(__file__).resolve().parent / "mappings"
VOCABULARY_FILE = Path(__file__).resolve().parent.parent / "policies" / "vocabulary.yaml"

COLUMN_TYPES: dict[str, type[TypeEngine]] = {
    "string": String,
    "integer": Integer,
    "decimal": Float,  # a JSON number either way; Float avoids SQLite's Decimal warning
    "boolean": Boolean,
    "date": Date,
    "datetime": DateTime,
}
_TOP_KEYS = frozenset({"version", "description", "records"})
_RECORD_KEYS = frozenset({"name", "resource_type", "categories", "table", "query", "columns", "patient_column",
                          "id", "order_by", "resource", "description"})
_REQUIRED_KEYS = frozenset({"name", "resource_type", "categories", "columns", "patient_column", "id", "resource"})
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,63}$")
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$")
_ID_TEMPLATE = re.compile(r"^(?P<prefix>[A-Za-z0-9\-.]{1,40})\{(?P<key>[a-z_][a-z0-9_]{0,62})\}$")
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_PLACEHOLDER = re.compile(r"\{([a-z_][a-z0-9_]{0,62})\}")
_SINGLE = re.compile(r"^\{([a-z_][a-z0-9_]{0,62})\}$")
_RESERVED = frozenset({"resourceType", "id"})
_OMIT = object()
Fail = Callable[[str], ValueError]


class MappingError(Exception):
    """A row could not be turned into a resource; the message names the record, never content."""


@dataclass(frozen=True, slots=True)
class Record:
    """One compiled mapping record: its statement, its template, and how ids map to keys."""

    name: str
    resource_type: str
    categories: tuple[str, ...]
    columns: Mapping[str, str]
    patient_column: str
    key_column: str
    id_prefix: str
    template: Mapping[str, Any]
    select: Select
    source: Path
    # Built once: a statement object reused keeps SQLAlchemy's memoized cache key, so executing it
    # again skips rebuilding and re-keying the SELECT (statements are immutable, safe to share).
    _search: Select = field(init=False, repr=False, compare=False)
    _read: Select = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        key_type = COLUMN_TYPES[self.columns[self.key_column]]()
        object.__setattr__(self, "_search", self.select.where(
            self._col(self.patient_column) == bindparam("patient", type_=String())))
        object.__setattr__(self, "_read", self.select.where(self._col(self.key_column) == bindparam("key", type_=key_type)))

    def search_statement(self) -> Select:
        """Rows of one youth; the id is bound as ``:patient``."""
        return self._search

    def read_statement(self) -> Select:
        """The row with one key; the key is bound as ``:key``."""
        return self._read

    def key_for(self, resource_id: str) -> object | None:
        """The key value an id stands for, or None if the id cannot come from this record."""
        if not resource_id.startswith(self.id_prefix):
            return None
        raw = resource_id[len(self.id_prefix):]
        if not raw:
            return None
        if self.columns[self.key_column] == "integer":
            return int(raw) if raw.isdigit() and len(raw) <= 18 else None
        return raw

    def render(self, row: Mapping[str, Any]) -> dict:
        """A fresh FHIR resource for one row; the record's categories go to ``meta.security``."""
        key = _json_value(row.get(self.key_column))
        if key is None or key == "":
            raise MappingError(f"record {self.name}: key column is NULL")
        rid = f"{self.id_prefix}{_text(key)}"
        if not _FHIR_ID.match(rid):
            raise MappingError(f"record {self.name}: key does not make a valid FHIR id")
        body = _render_dict(self.template, row, root=True)[0]
        meta = body.pop("meta", {})
        meta["security"] = [{"system": LOCAL_CATEGORY_SYSTEM, "code": c} for c in self.categories]
        return {"resourceType": self.resource_type, "id": rid, "meta": meta, **body}

    def _col(self, name: str) -> Any:
        return self.select.selected_columns[name]


@dataclass(frozen=True, slots=True)
class SqlMapping:
    """Every record of one mapping file, grouped by resource type in file order."""

    path: Path
    records: tuple[Record, ...]

    @property
    def resource_types(self) -> frozenset[str]:
        """The resource types this mapping can produce."""
        return frozenset(r.resource_type for r in self.records)

    def for_type(self, resource_type: str) -> tuple[Record, ...]:
        """The records that produce one resource type."""
        return tuple(r for r in self.records if r.resource_type == resource_type)


def vocabulary_categories(path: Path = VOCABULARY_FILE) -> frozenset[str]:
    """The category names in the policy vocabulary (labels must use these exact words)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        return frozenset(data["categories"])
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: cannot read the categories ({type(exc).__name__})") from None


def resolve_mapping_path(path: Path) -> Path:
    """An existing path as given; otherwise a relative path is looked up in connectors/mappings/."""
    if path.is_absolute() or path.exists():
        return path
    return MAPPINGS_DIR / path


def load_mapping_cached(path: Path, known_categories: Iterable[str]) -> SqlMapping:
    """``load_mapping``, reused while the file is unchanged (brokers built in one process share it)."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return load_mapping(path, known_categories)
    return _cached(str(path.resolve()), st.st_mtime_ns, st.st_size, frozenset(known_categories))


@lru_cache(maxsize=64)
def _cached(path: str, _mtime_ns: int, _size: int, known: frozenset[str]) -> SqlMapping:
    return load_mapping(Path(path), known)


def load_mapping(path: Path, known_categories: Iterable[str]) -> SqlMapping:
    """Read, validate and compile one mapping file; every problem is a ValueError naming the file."""
    path = Path(path)
    known = frozenset(known_categories)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read mapping file ({type(exc).__name__})") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a mapping file is a YAML mapping with a records list")
    unknown = set(map(str, data)) - _TOP_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys: {', '.join(sorted(unknown))}")
    if data.get("version", 1) != 1:
        raise ValueError(f"{path}: unsupported version (only 1)")
    raw_records = data.get("records")
    if not isinstance(raw_records, list) or not raw_records:
        raise ValueError(f"{path}: records must be a non-empty list")
    records: list[Record] = []
    for i, raw in enumerate(raw_records):
        records.append(_compile_record(path, i, raw, known))
    _check_unique(path, records)
    return SqlMapping(path=path, records=tuple(records))


def _check_unique(path: Path, records: list[Record]) -> None:
    seen: dict[str, Record] = {}
    for rec in records:
        if rec.name in seen:
            raise ValueError(f"{path}: record {rec.name!r}: name used twice")
        seen[rec.name] = rec
    for a in records:
        for b in records:
            if a is not b and a.resource_type == b.resource_type and b.id_prefix.startswith(a.id_prefix):
                raise ValueError(f"{path}: record {b.name!r}: id prefix {b.id_prefix!r} overlaps record "
                                 f"{a.name!r} ({a.id_prefix!r}); ids must say which record they come from")


def _compile_record(path: Path, index: int, raw: object, known: frozenset[str]) -> Record:
    label = f"records[{index}]"
    if isinstance(raw, dict) and isinstance(raw.get("name"), str):
        label = f"record {raw['name']!r}"

    def fail(problem: str) -> ValueError:
        return ValueError(f"{path}: {label}: {problem}")

    if not isinstance(raw, dict):
        raise fail("must be a mapping")
    keys = set(map(str, raw))
    if keys - _RECORD_KEYS:
        raise fail(f"unknown keys: {', '.join(sorted(keys - _RECORD_KEYS))}")
    if _REQUIRED_KEYS - keys:
        raise fail(f"missing keys: {', '.join(sorted(_REQUIRED_KEYS - keys))}")
    name = raw["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise fail("name must be lower-case letters, digits and dashes")
    resource_type = raw["resource_type"]
    model = _model(resource_type)
    if model is None:
        raise fail(f"unknown resource type {resource_type!r}")
    categories = raw["categories"]
    if not isinstance(categories, list) or not categories or not all(isinstance(c, str) for c in categories):
        raise fail("categories must be a non-empty list of category names")
    for c in categories:
        if c not in known:
            raise fail(f"unknown category {c!r}")
    columns = raw["columns"]
    if not isinstance(columns, dict) or not columns:
        raise fail("columns must map each column the query returns to its type")
    for col, kind in columns.items():
        if not isinstance(col, str) or not _IDENT.match(col):
            raise fail(f"column name {col!r} must be a lower-case SQL identifier")
        if kind not in COLUMN_TYPES:
            raise fail(f"column {col}: type must be one of {', '.join(COLUMN_TYPES)}")
    patient_column = raw["patient_column"]
    if patient_column not in columns:
        raise fail(f"patient_column {patient_column!r} is not in columns")
    m = _ID_TEMPLATE.match(raw["id"]) if isinstance(raw["id"], str) else None
    if m is None:
        raise fail("id must be a literal prefix followed by one {column}, e.g. cws-case-{case_id}")
    key_column = m["key"]
    if key_column not in columns:
        raise fail(f"id uses column {key_column!r} which is not in columns")
    if columns[key_column] not in ("string", "integer"):
        raise fail("the id column must be a string or integer column")
    stmt = _statement(raw, columns, fail)
    template = raw["resource"]
    if not isinstance(template, dict) or not template:
        raise fail("resource must be a FHIR JSON object template")
    if _RESERVED & set(template):
        raise fail("resource must not set resourceType or id (the record gives them)")
    if isinstance(template.get("meta"), dict) and "security" in template["meta"]:
        raise fail("resource must not set meta.security (categories gives it)")
    template = _expand_labels(template, known, fail)
    missing = sorted(_placeholders(template) - set(columns))
    if missing:
        raise fail(f"resource uses columns not in columns: {', '.join(missing)}")
    _check_patient_reference(template, patient_column, model, fail)
    record = Record(name=name, resource_type=resource_type, categories=tuple(dict.fromkeys(categories)),
                    columns=dict(columns), patient_column=patient_column, key_column=key_column,
                    id_prefix=m["prefix"], template=template, select=stmt, source=path)
    _validate_sample(record, model, fail)
    return record


def _statement(raw: dict, columns: dict[str, str], fail: Fail) -> Select:
    """The record's SELECT as SQLAlchemy Core: a table, or the query as a named subquery."""
    has_table, has_query = "table" in raw, "query" in raw
    if has_table == has_query:
        raise fail("give exactly one of table or query")
    cols = [column(name, COLUMN_TYPES[kind]()) for name, kind in columns.items()]
    if has_table:
        name = raw["table"]
        if not isinstance(name, str) or not _TABLE.match(name):
            raise fail("table must be a table name, optionally schema.table")
        schema, _, tname = name.rpartition(".")
        source = table(tname, *cols, schema=schema or None)
        stmt = select(*source.c)
    else:
        query = raw["query"]
        if not isinstance(query, str) or not re.match(r"^\s*(select|with)\b", query, re.IGNORECASE):
            raise fail("query must be one SELECT statement")
        if ";" in query.strip().rstrip(";"):
            raise fail("query must be one SELECT statement")
        textual = text(query.strip().rstrip(";"))
        if textual._bindparams:  # noqa: SLF001 - the public API has no accessor
            raise fail("query must not have bind parameters; the connector adds the youth filter")
        sub = textual.columns(*cols).subquery("mapped")
        stmt = select(*sub.c)
    order = raw.get("order_by", [])
    if not isinstance(order, list) or not all(isinstance(o, str) for o in order):
        raise fail("order_by must be a list of column names (prefix - for descending)")
    clauses = []
    for item in order:
        name = item[1:] if item.startswith("-") else item
        if name not in columns:
            raise fail(f"order_by uses column {name!r} which is not in columns")
        col = stmt.selected_columns[name]
        clauses.append(col.desc() if item.startswith("-") else col.asc())
    return stmt.order_by(*clauses) if clauses else stmt


def _expand_labels(node: Any, known: frozenset[str], fail: Fail) -> Any:
    """A copy of the template with ``$label`` turned into inline label extensions, all checked."""
    if isinstance(node, list):
        return [_expand_labels(v, known, fail) for v in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    labels: list[str] = []
    for key, value in node.items():
        if not isinstance(key, str):
            raise fail(f"element name {key!r} must be a string")
        if key == "$label":
            labels = [value] if isinstance(value, str) else value
            if not isinstance(labels, list) or not labels or not all(isinstance(v, str) for v in labels):
                raise fail("$label must be a category or a list of categories")
            continue
        if key.startswith("$"):
            raise fail(f"unknown directive {key}")
        out[key] = _expand_labels(value, known, fail)
    for ext in out.get("extension", []) if isinstance(out.get("extension"), list) else []:
        if isinstance(ext, dict) and ext.get("url") == INLINE_LABEL_URL:
            coding = ext.get("valueCoding") or {}
            if coding.get("system") != LOCAL_CATEGORY_SYSTEM or coding.get("code") not in known:
                raise fail("an inline security label must name a known category in the local category system")
    for category in labels:
        if category not in known:
            raise fail(f"$label names unknown category {category!r}")
        out.setdefault("extension", [])
        if not isinstance(out["extension"], list):
            raise fail("extension must be a list")
        out["extension"].append({"url": INLINE_LABEL_URL,
                                 "valueCoding": {"system": LOCAL_CATEGORY_SYSTEM, "code": category}})
    return out


def _check_patient_reference(template: dict, patient_column: str, model: type, fail: Fail) -> None:
    """The resource must name its youth where connectors.base.belongs_to_patient looks."""
    want = {"reference": f"Patient/{{{patient_column}}}"}
    fields = [f for f in ("subject", "patient") if f in model.model_fields]
    if not fields:
        raise fail("resource type has neither subject nor patient; the broker could not tell whose it is")
    if not any(template.get(f) == want for f in fields):
        raise fail(f"resource must have {fields[0]}: {{reference: \"Patient/{{{patient_column}}}\"}}")


def _validate_sample(record: Record, model: type, fail: Fail) -> None:
    """Render a row of sample values and validate it as FHIR R4(B): catches misspelt elements."""
    samples = {"string": "sample", "integer": 1, "decimal": 1.5, "boolean": True, "date": date(2000, 1, 2),
               "datetime": datetime(2000, 1, 2, 3, 4, 5, tzinfo=UTC)}
    row = {name: samples[kind] for name, kind in record.columns.items()}
    try:
        model.model_validate(record.render(row))
    except MappingError as exc:
        raise fail(str(exc)) from None
    except Exception as exc:  # pydantic's ValidationError; report where, not the values
        errors = getattr(exc, "errors", None)
        where = "; ".join(".".join(map(str, e.get("loc", ()))) + ": " + str(e.get("msg", ""))
                          for e in errors()[:5]) if callable(errors) else type(exc).__name__
        raise fail(f"a sample row does not make a valid {record.resource_type}: {where}") from None


def _model(resource_type: object) -> type | None:
    if not isinstance(resource_type, str) or not re.match(r"^[A-Z][A-Za-z]{1,63}$", resource_type):
        return None
    from fhir.resources.R4B import get_fhir_model_class

    try:
        model = get_fhir_model_class(resource_type)
    except (ValueError, KeyError, ImportError):
        return None
    from fhir.resources.R4B.domainresource import DomainResource

    return model if isinstance(model, type) and issubclass(model, DomainResource) else None


def _placeholders(node: Any) -> set[str]:
    if isinstance(node, str):
        return set(_PLACEHOLDER.findall(node))
    if isinstance(node, dict):
        return set().union(*(_placeholders(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(_placeholders(v) for v in node)) if node else set()
    return set()


def _json_value(value: object) -> object:
    """A database value as JSON: dates as FHIR dates, naive datetimes as UTC, numbers as numbers."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    raise MappingError(f"unsupported column value type {type(value).__name__}")


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _render_string(template: str, row: Mapping[str, Any]) -> tuple[object, bool]:
    single = _SINGLE.match(template)
    if single:
        value = _json_value(row.get(single[1]))
        return (_OMIT if value is None or value == "" else value), True
    names = _PLACEHOLDER.findall(template)
    if not names:
        return template, False
    values = {}
    for name in names:
        value = _json_value(row.get(name))
        if value is None or value == "":
            return _OMIT, True
        values[name] = _text(value)
    return _PLACEHOLDER.sub(lambda m: values[m[1]], template), True


def _render(node: Any, row: Mapping[str, Any]) -> tuple[object, bool]:
    """(value or _OMIT, whether the node holds column data)."""
    if isinstance(node, str):
        return _render_string(node, row)
    if isinstance(node, dict):
        return _render_dict(node, row, root=False)
    if isinstance(node, list):
        out: list[Any] = []
        dynamic = kept = False
        for item in node:
            value, dyn = _render(item, row)
            dynamic |= dyn
            if value is not _OMIT:
                out.append(value)
                kept |= dyn
        if (dynamic and not kept) or not out:
            return _OMIT, dynamic
        return out, dynamic
    return node, False


def _render_dict(node: Mapping[str, Any], row: Mapping[str, Any], *, root: bool) -> tuple[Any, bool]:
    out: dict[str, Any] = {}
    dynamic = kept = False
    for key, child in node.items():
        value, dyn = _render(child, row)
        dynamic |= dyn
        if value is not _OMIT:
            out[key] = value
            kept |= dyn
    if not root and ((dynamic and not kept) or not out):
        return _OMIT, dynamic
    return out, dynamic
