"""server/app/ws/protocol.py on its own: SCHEMA and validate().

Cases are generated from SCHEMA, so a message type or field added there is
covered here without editing this file. Every rejection must be a
``ClientError`` with the documented code (the websocket sends it as an
``error`` reply; anything else would drop the connection).
"""

from __future__ import annotations

import copy

import pytest

from server.app.ws.protocol import MAX_PATH_CHARS, SCHEMA, validate
from server.errors import ClientError

# A value of each Python type the schema uses; `sample` picks one that fits.
SAMPLES = {str: "a.py", int: 1, float: 0.5, dict: {}, list: []}
# Values that a JSON decoder can hand us, for the wrong-type cases.
JSON_VALUES = ["text", 7, 2.5, True, {}, [], ["x"]]
# Cross-field rules validate() adds on top of the per-field schema: the least a
# minimal message of that type needs besides its required fields.
MINIMAL_EXTRAS = {"edit": {"text": "x = 1\n"}}


def typed(value, types) -> bool:
    """What the protocol means by 'value has one of types' (a bool is never an int)."""
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def sample(types):
    return copy.deepcopy(SAMPLES[types[0]])


def minimal(kind: str) -> dict:
    msg = {"type": kind}
    for field, (types, required) in SCHEMA[kind].items():
        if required:
            msg[field] = sample(types)
    msg.update(copy.deepcopy(MINIMAL_EXTRAS.get(kind, {})))
    return msg


def fields(predicate):
    return [pytest.param(kind, field, id=f"{kind}.{field}")
            for kind, spec in SCHEMA.items() for field, (types, required) in spec.items()
            if predicate(types, required)]


def rejects(msg, code: str) -> ClientError:
    before = copy.deepcopy(msg)
    with pytest.raises(ClientError) as err:
        validate(msg)
    assert err.value.code == code, err.value.message
    assert err.value.message and err.value.status == 400
    assert msg == before  # validation never edits the message
    return err.value


def test_schema_is_well_formed():
    # Guards the generators below: every field names Python types and a required flag.
    assert SCHEMA
    for kind, spec in SCHEMA.items():
        assert "type" not in spec, kind
        for field, (types, required) in spec.items():
            assert isinstance(types, tuple) and types and all(isinstance(t, type) for t in types), (kind, field)
            assert types[0] in SAMPLES, (kind, field)
            assert isinstance(required, bool), (kind, field)


@pytest.mark.parametrize("kind", sorted(SCHEMA))
def test_minimal_message_of_every_type_is_valid(kind):
    msg = minimal(kind)
    assert validate(msg) == msg


@pytest.mark.parametrize("kind", sorted(SCHEMA))
def test_every_optional_field_with_a_valid_value_is_accepted(kind):
    msg = minimal(kind)
    for field, (types, required) in SCHEMA[kind].items():
        if not required and field not in msg and not (kind == "edit" and field in ("text", "changes")):
            msg[field] = sample(types)
    if kind == "complete":  # a cursor needs a path and both coordinates; mode names a known mode
        msg["cursor"] = {"line": 0, "character": 3}
        msg["mode"] = "line"
    validate(msg)


@pytest.mark.parametrize("mode", ["block", "line", "raw"])
def test_completion_modes(mode):
    validate({"type": "complete", "id": "c1", "prefix": "x", "mode": mode})


def test_unknown_completion_mode_is_rejected():
    rejects({"type": "complete", "id": "c1", "prefix": "x", "mode": "paragraph"}, "invalid_field")


@pytest.mark.parametrize("kind, field", fields(lambda types, required: required))
def test_missing_required_field(kind, field):
    msg = minimal(kind)
    del msg[field]
    err = rejects(msg, "missing_field")
    assert repr(field) in err.message


@pytest.mark.parametrize("kind, field", fields(lambda types, required: required))
def test_required_field_given_as_null_counts_as_missing(kind, field):
    rejects({**minimal(kind), field: None}, "missing_field")


@pytest.mark.parametrize("kind", sorted(SCHEMA))
def test_unknown_field(kind):
    err = rejects({**minimal(kind), "bogus": 1}, "unknown_field")
    assert "bogus" in err.message


@pytest.mark.parametrize("kind, field", fields(lambda types, required: True))
def test_wrong_type(kind, field):
    types = SCHEMA[kind][field][0]
    wrong = [v for v in JSON_VALUES if not typed(v, types)]
    assert wrong, f"{kind}.{field} accepts every JSON value"
    for value in wrong:
        err = rejects({**minimal(kind), field: copy.deepcopy(value)}, "invalid_field")
        assert repr(field) in err.message


@pytest.mark.parametrize("kind, field", fields(lambda types, required: int in types and bool not in types))
def test_bool_is_not_an_int(kind, field):
    for value in (True, False):
        rejects({**minimal(kind), field: value}, "invalid_field")


@pytest.mark.parametrize("kind, field", fields(lambda types, required: float in types))
def test_numbers_accept_int_and_float(kind, field):
    for value in (0, 1.25):
        validate({**minimal(kind), field: value})


@pytest.mark.parametrize("msg", [None, [], ["hello"], "hello", 3, True], ids=repr)
def test_non_object(msg):
    rejects(msg, "invalid_message")


@pytest.mark.parametrize("msg", [{}, {"type": None}, {"type": 1}, {"type": ["ping"]}, {"id": 1}], ids=repr)
def test_missing_or_non_string_type(msg):
    rejects(msg, "invalid_message")


@pytest.mark.parametrize("kind", ["nope", "", "PING", "completion.done", "ready"])
def test_unknown_type(kind):
    # Server-to-client types (ready, completion.done) are not client messages either.
    assert kind not in SCHEMA
    err = rejects({"type": kind}, "unknown_type")
    assert repr(kind) in err.message


# -- sub-objects -------------------------------------------------------------------

@pytest.mark.parametrize("kind, field", fields(lambda types, required: dict in types))
def test_sub_object_unknown_key(kind, field):
    msg = {**minimal(kind), field: {"bogus": "x"}}
    if kind == "complete":
        msg["path"] = "a.py"
    err = rejects(msg, "unknown_field")
    assert "bogus" in err.message and field in err.message


@pytest.mark.parametrize("kind, field, value", [
    ("hello", "client", {"name": "vscode", "version": "1.0"}),
    ("hello", "repository", {"id": "github.com/me/app", "root_name": "app"}),
    ("hello", "repository", {"root_name": "app"}),  # every key is optional
    ("hello", "repository", {"id": None}),  # and may be null
    ("complete", "cursor", {"line": 0, "character": 0}),
])
def test_sub_object_valid(kind, field, value):
    validate({**minimal(kind), "path": "a.py", field: value} if kind == "complete" else {**minimal(kind), field: value})


@pytest.mark.parametrize("kind, field, value", [
    ("hello", "client", {"name": 1}),
    ("hello", "client", {"version": ["1"]}),
    ("hello", "repository", {"id": True}),
    ("complete", "cursor", {"line": "0", "character": 0}),
    ("complete", "cursor", {"line": True, "character": 0}),
    ("complete", "cursor", {"line": 0, "character": 1.5}),
])
def test_sub_object_wrong_type(kind, field, value):
    msg = {**minimal(kind), field: value}
    if kind == "complete":
        msg["path"] = "a.py"
    rejects(msg, "invalid_field")


# -- cross-field rules ------------------------------------------------------------

def test_edit_needs_exactly_one_of_text_and_changes():
    base = {"type": "edit", "path": "a.py", "version": 2}
    validate({**base, "text": "x"})
    validate({**base, "changes": [{"text": "x"}]})
    rejects(dict(base), "invalid_field")
    rejects({**base, "text": "x", "changes": []}, "invalid_field")


@pytest.mark.parametrize("kind", sorted(k for k, spec in SCHEMA.items() if "path" in spec))
def test_path_length(kind):
    msg = minimal(kind)
    if kind == "edit":
        msg["text"] = "x"
    validate({**msg, "path": "p" * MAX_PATH_CHARS})
    rejects({**msg, "path": ""}, "invalid_field")
    rejects({**msg, "path": "p" * (MAX_PATH_CHARS + 1)}, "invalid_field")


def test_complete_cursor_rules():
    base = {"type": "complete", "id": "c1"}
    rejects({**base, "cursor": {"line": 0, "character": 0}}, "missing_field")  # cursor needs a document
    rejects({**base, "path": "a.py", "cursor": {"line": 0}}, "invalid_field")
    rejects({**base, "path": "a.py", "cursor": {}}, "invalid_field")
    validate({**base, "path": "a.py", "cursor": {"line": 2, "character": 4}})


def test_complete_stop_is_a_string_or_strings():
    base = {"type": "complete", "id": 7, "prefix": "x = "}
    validate({**base, "stop": "\n"})
    validate({**base, "stop": ["\n", "def "]})
    validate({**base, "stop": []})
    rejects({**base, "stop": ["\n", 3]}, "invalid_field")
    rejects({**base, "stop": [None]}, "invalid_field")
    rejects({**base, "stop": {"a": 1}}, "invalid_field")


def test_ids_may_be_strings_or_ints_but_not_floats():
    for value in ("c1", 0, 12):
        validate({"type": "cancel", "id": value})
    for value in (1.0, True, [1], {"id": 1}):
        rejects({"type": "cancel", "id": value}, "invalid_field")


def test_null_fields_are_absent_in_what_validate_returns():
    msg = {"type": "complete", "id": "c1", "path": "a.py", "cursor": None, "max_tokens": None,
           "temperature": None}
    assert validate(msg) == {"type": "complete", "id": "c1", "path": "a.py"}
    assert msg["cursor"] is None  # the input itself is untouched
    rejects({"type": "complete", "id": "c1", "path": "a.py", "cursor": {"line": None, "character": 1}},
            "invalid_field")


def test_edit_with_null_text_and_no_changes_is_rejected():
    rejects({"type": "edit", "path": "a.py", "version": 2, "text": None}, "invalid_field")
