"""Reading a JSON config file against a table of its keys: the one parsing
mechanism of both config files, overlaybd.json (tcmu_obd.service_config) and
config.v1.json (tcmu_obd.image.config).

A Table maps each key of a JSON object to a Key: its kind (a scalar kind
from KINDS, a nested Table, or ListOf a Table for an array of objects), its
default and an optional check of the value.  read() reads a parsed JSON
object against a table, with the same rules for every file:
- a value of the wrong kind, or one its check refuses, is a ConfigError (or
  the Key's error class) naming the file, the key path and the value, as
  `<file>: <key path> = <value as JSON>: <why>`;
- an unknown key is ignored with an UnknownKeyWarning naming its path;
- read_json() reads the file as RapidJSON does: the first of a key given twice
  wins, NaN and Infinity are refused.
This module knows no key of its own (the tables live with each file's
parser) and does no check that involves two keys (the parsers do those).
"""
import json
import math
import warnings
from dataclasses import dataclass

from tcmu_obd.errors import ConfigError, UnknownKeyWarning

_U32, _I32, _U64, _I64 = (0, 2**32 - 1), (-2**31, 2**31 - 1), (0, 2**64 - 1), (-2**63, 2**63 - 1)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


# kind -> (what a message says was expected, predicate)
KINDS = {
    "bool": ("a JSON boolean", lambda v: isinstance(v, bool)),
    "str": ("a JSON string", lambda v: isinstance(v, str)),
    "u32": ("an integer in [0, 2^32-1]", lambda v: _is_int(v) and _U32[0] <= v <= _U32[1]),
    "i32": ("an integer in [-2^31, 2^31-1]", lambda v: _is_int(v) and _I32[0] <= v <= _I32[1]),
    "u64": ("an integer in [0, 2^64-1]", lambda v: _is_int(v) and _U64[0] <= v <= _U64[1]),
    "i64": ("an integer in [-2^63, 2^63-1]", lambda v: _is_int(v) and _I64[0] <= v <= _I64[1]),
    "num": ("a JSON number", lambda v: (_is_int(v) or isinstance(v, float)) and math.isfinite(v)),
}


@dataclass(frozen=True)
class Table:
    """The keys of one JSON object.  `make` builds the parsed value from a
    dict {JSON key: parsed value} of the keys present (default: that dict)."""
    keys: dict
    make: object = dict


@dataclass(frozen=True)
class ListOf:
    """A JSON array whose items are objects of `table`."""
    table: Table


@dataclass(frozen=True)
class Key:
    """One key: its kind (a KINDS name, a Table or a ListOf), its default
    (what the file means when the key is absent), and `check(value)`, which
    returns None or why the value is refused; `error` is the class raised then."""
    kind: object
    default: object = None
    check: object = None
    error: type = ConfigError


def show(val):
    """A value as it appears in messages: JSON, cut to 80 characters."""
    try:
        text = json.dumps(val, allow_nan=False)
    except (TypeError, ValueError):        # callers may pass values that are not JSON
        text = repr(val)
    return text if len(text) <= 80 else text[:77] + "..."


def refuse(source, path, val, why, error=ConfigError):
    """The error for a refused value, in the one message format."""
    return error(f"{source}: {path} = {show(val)}: {why}")


def read(obj, table, source, prefix=""):
    """Read the JSON object `obj` against `table`: (parsed value, unknown key
    paths).  Each unknown key is also warned about.  `source` names the file,
    `prefix` the object's own key path ("download." for a nested one)."""
    unknown = []
    value = _read_object(obj, table, source, prefix, unknown)
    for path in unknown:
        warnings.warn(f"{source}: unknown key {path} ignored", UnknownKeyWarning, stacklevel=2)
    return value, tuple(unknown)


def _read_object(obj, table, source, prefix, unknown):
    if not isinstance(obj, dict):
        raise refuse(source, prefix[:-1] if prefix else "(top level)", obj, "expected a JSON object")
    out = {}
    for name, val in obj.items():             # document order, so warnings read naturally
        key = table.keys.get(name)
        path = prefix + name
        if key is None:
            unknown.append(path)
            continue
        out[name] = _read_value(val, key.kind, source, path, unknown)
        why = key.check(out[name]) if key.check is not None else None
        if why:
            raise refuse(source, path, val, why, key.error)
    return table.make(out)


def _read_value(val, kind, source, path, unknown):
    if isinstance(kind, Table):
        return _read_object(val, kind, source, path + ".", unknown)
    if isinstance(kind, ListOf):
        if not isinstance(val, list):
            raise refuse(source, path, val, "expected a JSON array")
        return [_read_object(item, kind.table, source, f"{path}[{i}].", unknown)
                for i, item in enumerate(val)]
    what, ok = KINDS[kind]
    if not ok(val):
        raise refuse(source, path, val, f"expected {what}")
    return val


def _first_wins(pairs):
    out = {}
    for key, val in pairs:
        out.setdefault(key, val)          # RapidJSON's FindMember returns the first member
    return out


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def read_json(path):
    """The parsed JSON of the file at `path`; a ConfigError naming it when it
    cannot be read or is not JSON."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        return json.loads(text.decode("utf-8"), object_pairs_hook=_first_wins,
                          parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
