"""Hypothesis strategies the fuzz tests share (tests/server/app/test_fuzz_http.py and test_fuzz_ws.py).

Values start from a schema (pydantic's ``model_json_schema()`` for HTTP bodies, the protocol's ``SCHEMA``
for websocket messages) and are then broken the ways a hostile client breaks them: wrong types, huge,
negative and non-finite numbers, lone surrogates, deep nesting, undeclared fields, missing required ones;
``encoded`` turns them into bytes that are sometimes not UTF-8 or not whole.
"""

from __future__ import annotations

import json
import operator

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

EXAMPLES = 500
# The same examples on every run, so CI is reproducible, and no example database written to disk.
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example, HealthCheck.filter_too_much])

LONE_SURROGATE = st.integers(0xD800, 0xDFFF).map(chr)  # st.characters() leaves surrogates out

HOSTILE_TEXT = st.one_of(
    st.builds(lambda a, s, b: a + s + b, st.text(max_size=6), LONE_SURROGATE, st.text(max_size=6)),
    st.just("\ud83d\ude00"),  # a pair written as two escapes: one character once parsed, and fine
    # Huge: up to ~7 MB as escaped JSON, past the body limit (413) and the model's context.
    st.builds(operator.mul, st.sampled_from(["a", "\u00e9", "\U0001F600", "\n", "\x00"]),
              st.sampled_from([5_000, 100_000, 600_000])),
    st.sampled_from(["", " ", "\x00", "..", "../../etc/passwd", "%00", "\\", "\u202e", "session-", "ftjob-1",
                     "file-1", "ftevent-\u00b2", "\u0663", "-1", "1e999", "NaN"]),
)
TEXT = st.one_of(st.text(max_size=24), HOSTILE_TEXT)

NUMBERS = st.one_of(
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.sampled_from([0, -1, 2 ** 31, 2 ** 53 + 1, 2 ** 63 - 1, 2 ** 63, 2 ** 64, -(2 ** 63) - 1, 10 ** 400]),
    st.floats(),  # NaN, +-inf, -0.0, subnormals: json.dumps writes NaN and Infinity, which Python parses
)

# Text that looks like a number: digits int() refuses ("\u00b2" passes str.isdigit), others it takes ("\u0663",
# "1_000", " 1"), and forms it does not ("0x1", "1e3").
NUMERIC_TEXT = st.one_of(
    st.sampled_from(["\u00b2", "\u2460", "\u0663", "\U0001D7D9", "0x1", "1_000", " 1", "+1", "-1", "1e3", "01", ""]),
    st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=3), NUMBERS.map(str))


def nest(depth: int, kind: str):
    value = 0
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


DEEP = st.builds(nest, st.integers(1, 150), st.sampled_from(["list", "dict"]))  # the limit is 64
JSON = st.recursive(st.none() | st.booleans() | NUMBERS | TEXT,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=8)
HOSTILE = st.one_of(JSON, DEEP, HOSTILE_TEXT, NUMBERS)


# True one time in ten (hypothesis favours small integers, and so the first of sampled values: not
# st.integers(0, 9) == 0).
RARELY = st.sampled_from([False] * 9 + [True])


def valid(node: dict, defs: dict) -> st.SearchStrategy:
    """Values of one node of a JSON schema (the part of it pydantic writes), often at the edges of its limits."""
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        return st.deferred(lambda: valid(defs[name], defs))
    if "anyOf" in node:
        return st.one_of([valid(n, defs) for n in node["anyOf"]])
    if "const" in node:
        return st.just(node["const"])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    kind = node.get("type")
    if kind == "string" and "pattern" in node:
        return st.from_regex(node["pattern"], fullmatch=True)
    if kind == "string":
        return st.text(max_size=node.get("maxLength", 24))
    if kind == "integer":
        lo = node.get("minimum", node["exclusiveMinimum"] + 1 if "exclusiveMinimum" in node else None)
        hi = node.get("maximum")
        base = lo if lo is not None else 0
        near = st.integers(base, base + 8 if hi is None else min(hi, base + 8))  # small values run fast
        return st.one_of(near, st.integers(lo, hi))
    if kind == "number":
        return st.floats(node.get("minimum", node.get("exclusiveMinimum")), node.get("maximum"),
                         exclude_min="exclusiveMinimum" in node, allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        least = node.get("minItems", 0)
        return st.lists(valid(node.get("items", {}), defs), min_size=least, max_size=max(least, 3))
    if kind == "object":
        return objects(node, defs)
    return JSON


@st.composite
def objects(draw, node: dict, defs: dict):
    """An object of the node's properties: all valid, or with one or several of them hostile; sometimes
    without a required one, sometimes with an undeclared one."""
    props, required = node.get("properties", {}), node.get("required", [])
    names = [n for n in props if n in required or draw(st.booleans())]
    damage = draw(st.sampled_from(["none"] * 4 + ["one"] * 2 + ["many"]))
    target = draw(st.sampled_from(names)) if names and damage == "one" else None
    out = {}
    for name in names:
        bad = name == target or (damage == "many" and draw(st.booleans()))
        out[name] = draw(HOSTILE if bad else valid(props[name], defs))
    if required and draw(RARELY):
        out.pop(draw(st.sampled_from(required)), None)
    if draw(RARELY):
        out[draw(st.text(max_size=12))] = draw(HOSTILE)
    return out


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, drawn in proportion to its weight (``st.one_of`` flattens nested choices, so
    repeating a strategy there does not weigh it)."""
    picks = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(picks).flatmap(lambda strategy: strategy)


def bodies(schema: dict) -> st.SearchStrategy:
    """Bodies for a JSON schema: mostly objects of its shape (see ``objects``), sometimes any JSON at all."""
    return weighted((6, valid(schema, schema.get("$defs", {}))), (1, HOSTILE))


@st.composite
def encoded(draw, values: st.SearchStrategy) -> bytes:
    """A value as JSON bytes, sometimes broken: surrogates written raw (not UTF-8), a stray byte, a cut."""
    value = draw(values)
    how = draw(st.sampled_from(["escaped"] * 5 + ["raw", "stray", "cut"]))
    if how == "raw":
        return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    data = json.dumps(value).encode()
    if how == "escaped":
        return data
    at = draw(st.integers(0, len(data)))
    if how == "cut":
        return data[:at]
    return data[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80", b"\x00", b"\xf4\x90\x80\x80"])) \
        + data[at:]
