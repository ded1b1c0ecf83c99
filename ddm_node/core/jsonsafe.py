"""The one JSON loader for bytes that came from a peer (or from a file a peer's bytes were written to).

`loads` bounds what a hostile document can cost before the parser sees it, and turns every way it can
fail into one exception type with a one-line message naming its source:
- size: at most `max_bytes` bytes;
- nesting: at most `max_depth` levels of arrays and objects, checked on the raw bytes first (strings
  blanked out, then innermost bracket pairs peeled off one level per pass, all in C-speed regex passes)
  so that `[[[[...` never reaches the recursive parser (the stdlib parser raises RecursionError, which
  nothing expects, on about 1,000 levels);
- numbers: floats must be finite (`1e400` parses to inf in the stdlib: refused), the literals
  `NaN`, `Infinity` and `-Infinity` are refused, integers are limited to `MAX_INT_DIGITS` digits (the
  interpreter's own default limit, fixed here whatever the interpreter is set to: it bounds parse time);
- text: UTF-8 only.
Integers are exact and otherwise unbounded here; their ranges are the reader's business (a manifest's
`check`, a training state's `check_extra`), since only the reader knows what a field means.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from ddm_node.core.errors import DDMError, IntegrityError

MAX_DEPTH = 32  # every format of ours nests at most about 6 levels
MAX_INT_DIGITS = 4300
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # a JSON string (unrolled: no backtracking)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")
_PAIR = re.compile(rb"\[\]|\{\}")


class _Refused(ValueError):
    """A number or literal the loader refuses (raised from the parser's hooks)."""


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"{text[:24]} is not a finite number")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"integer of {len(text)} digits")
    return int(text)


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name}: numbers must be finite")


def nesting_depth(raw: bytes, limit: int) -> int:
    """Levels of array/object nesting in `raw`, counted without parsing (`limit + 1` as soon as it is known to
    be deeper than `limit`). Pass n peels off every container whose innermost content was peeled by pass n-1.
    Brackets that do not pair up (the parser reports those) count as an upper bound: the passes so far plus
    every opening bracket left, since the parser may descend through all of them before it finds the error."""
    rest = _NOT_BRACKET.sub(b"", _STRING.sub(b'""', raw))
    depth = 0
    while rest:
        if depth >= limit:
            return limit + 1
        peeled = _PAIR.sub(b"", rest)
        if len(peeled) == len(rest):
            return min(limit + 1, depth + rest.count(b"[") + rest.count(b"{"))
        rest, depth = peeled, depth + 1
    return depth


def loads(raw: bytes | bytearray | memoryview | str, source: str, *, max_bytes: int, max_depth: int = MAX_DEPTH,
          error: type[DDMError] = IntegrityError) -> Any:
    """Parse untrusted JSON within the bounds of the module docstring; `error` (one line naming `source`)
    for anything else, never another exception."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    raw = bytes(raw)
    if len(raw) > max_bytes:
        raise error(f"{source}: JSON too large ({len(raw)} bytes, at most {max_bytes})")
    if nesting_depth(raw, max_depth) > max_depth:
        raise error(f"{source}: JSON nested deeper than {max_depth} levels")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{source}: not valid JSON (not UTF-8)") from None
    try:
        return json.loads(text, parse_float=_finite_float, parse_int=_bounded_int, parse_constant=_no_constant)
    except _Refused as exc:
        raise error(f"{source}: refused JSON value ({exc})") from None
    except (ValueError, RecursionError, MemoryError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise error(f"{source}: not valid JSON ({first[:120]})") from None


def load_file(path, *, max_bytes: int, max_depth: int = MAX_DEPTH, error: type[DDMError] = IntegrityError) -> Any:
    """`loads` of a file's bytes, reading at most `max_bytes + 1` of them (an unreadable file is `error` too)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    return loads(raw, str(path), max_bytes=max_bytes, max_depth=max_depth, error=error)
