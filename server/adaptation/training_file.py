"""Training files for fine-tuning jobs: JSONL, one ``{"prompt", "completion"}`` or ``{"text"}`` object a line.

``parse`` checks an upload (``POST /v1/files``) and names the first bad line;
``examples`` turns the records into training examples with the builder that
repository jobs use, so both kinds of job weigh tokens the same way.
"""

from __future__ import annotations

import json

from code_signals.privacy import secret_reason
from server.json_depth import MAX_JSON_DEPTH, json_too_deep

SHAPE = "expected an object with prompt and completion, or text"
MAX_EXAMPLES_PER_TEXT = 64  # as for one repository file


class TrainingFileError(ValueError):
    pass


def parse(data: bytes) -> list[dict]:
    """The records of a JSONL training file; raises TrainingFileError naming the first bad line."""
    if b"\x00" in data:
        raise TrainingFileError("the file is binary: upload UTF-8 JSONL text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise TrainingFileError(f"line {line}: not UTF-8 text: upload UTF-8 JSONL") from None
    records = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        # Checked before json.loads, which recurses once per level: a deep line would end in RecursionError.
        # No record nests (its values are strings), so the limit refuses no good line.
        if json_too_deep(line):
            raise TrainingFileError(f"line {number}: JSON nested deeper than {MAX_JSON_DEPTH} levels; {SHAPE}")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TrainingFileError(f"line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        records.append(_check(record, number))
    if not records:
        raise TrainingFileError(f"the file has no examples: {SHAPE} on each line")
    return records


def _check(record, number: int) -> dict:
    if isinstance(record, dict) and set(record) == {"prompt", "completion"} and all(
            isinstance(v, str) for v in record.values()):
        if not record["completion"].strip():
            raise TrainingFileError(f"line {number}: the completion is empty")
        return _no_secret(record, number)
    if isinstance(record, dict) and set(record) == {"text"} and isinstance(record["text"], str):
        if not record["text"].strip():
            raise TrainingFileError(f"line {number}: the text is empty")
        return _no_secret(record, number)
    raise TrainingFileError(f"line {number}: {SHAPE}")


def _no_secret(record: dict, number: int) -> dict:
    # The privacy rules that keep secret files out of training hold for uploaded examples too.
    why = secret_reason("\n".join(record.values()))
    if why is not None:
        raise TrainingFileError(f"line {number}: holds a secret ({why}); remove it (see docs/privacy.md)")
    return record


def examples(builder, records: list[dict]) -> list:
    """TrainingExamples of the records (``builder``: a code_signals ExampleBuilder)."""
    out = []
    for record in records:
        if "text" in record:  # plain text: every token is a target, as in a repository file
            out += builder.from_file(record["text"], max_examples=MAX_EXAMPLES_PER_TEXT)
        else:
            # The completion as an edit that appends it to the prompt: the prompt is the
            # context (weight 0), the completion the targets.
            out += builder.from_edit(record["prompt"], record["prompt"] + record["completion"])
    return out
