"""A structural-schema validator for ConnectionBudget manifests, as the API server applies it.

Pure: no I/O; the schema comes in as an argument (from the CRD in ``crds/``). It checks what the
API server checks from an OpenAPI v3 structural schema: types (an integer is never a boolean),
required fields, enums, bounds, lengths, list and map sizes, and unknown fields (kubectl's strict
field validation refuses them). CEL rules are not evaluated here; ``parse_spec`` checks the same
rules in Python.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

Schema = Mapping[str, object]


def _type_ok(kind: object, value: object) -> bool:
    if kind == "object":
        return isinstance(value, Mapping)
    if kind == "array":
        return isinstance(value, list)
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    return True


def _num(schema: Schema, key: str) -> float | None:
    v = schema.get(key)
    return float(v) if isinstance(v, int | float) else None


def validate(schema: Schema, value: object, path: str = "") -> list[str]:
    """Return every problem of ``value`` against ``schema``, each prefixed by its field path."""
    where = path or "<root>"
    kind = schema.get("type")
    if value is None:
        return [] if schema.get("nullable") else [f"{where}: must not be null"]
    if kind is not None and not _type_ok(kind, value):
        return [f"{where}: must be of type {kind}"]
    problems: list[str] = []
    enum = schema.get("enum")
    if isinstance(enum, list) and value not in enum:
        problems.append(f"{where}: must be one of {', '.join(map(str, enum))}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        low, high = _num(schema, "minimum"), _num(schema, "maximum")
        if low is not None and value < low:
            problems.append(f"{where}: must be at least {low:g}")
        if high is not None and value > high:
            problems.append(f"{where}: must be at most {high:g}")
    if isinstance(value, str):
        low, high = _num(schema, "minLength"), _num(schema, "maxLength")
        if low is not None and len(value) < low:
            problems.append(f"{where}: must be at least {low:g} characters long")
        if high is not None and len(value) > high:
            problems.append(f"{where}: must be at most {high:g} characters long")
    if isinstance(value, list):
        low, high = _num(schema, "minItems"), _num(schema, "maxItems")
        if low is not None and len(value) < low:
            problems.append(f"{where}: must have at least {low:g} items")
        if high is not None and len(value) > high:
            problems.append(f"{where}: must have at most {high:g} items")
        items = schema.get("items")
        if schema.get("x-kubernetes-list-type") == "set" and len({repr(v) for v in value}) != len(
            value
        ):
            problems.append(f"{where}: must not contain duplicates")
        if isinstance(items, Mapping):
            for i, item in enumerate(value):
                problems += validate(cast(Schema, items), item, f"{path}[{i}]")
    if isinstance(value, Mapping):
        problems += _validate_object(schema, cast(Mapping[str, object], value), path)
    return problems


def _validate_object(schema: Schema, value: Mapping[str, object], path: str) -> list[str]:
    problems: list[str] = []
    prefix = f"{path}." if path else ""
    props = schema.get("properties")
    # The API server prunes a null in a field that is not nullable, before defaulting and
    # validation: such a field counts as absent.
    value = {
        k: v
        for k, v in value.items()
        if v is not None
        or (isinstance(props, Mapping) and cast(Schema, props.get(k) or {}).get("nullable"))
    }
    required = schema.get("required")
    for key in cast(Sequence[str], required if isinstance(required, list) else []):
        if key not in value:
            problems.append(f"{prefix}{key}: required")
    high = _num(schema, "maxProperties")
    if high is not None and len(value) > high:
        problems.append(f"{path or '<root>'}: must have at most {high:g} entries")
    extra = schema.get("additionalProperties")
    preserve = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
    for key, item in value.items():
        if isinstance(props, Mapping) and key in props:
            problems += validate(cast(Schema, props[key]), item, f"{prefix}{key}")
        elif isinstance(extra, Mapping):
            problems += validate(cast(Schema, extra), item, f"{prefix}{key}")
        elif isinstance(props, Mapping) and not preserve and path != "metadata":
            problems.append(f"{prefix}{key}: unknown field")
    return problems
