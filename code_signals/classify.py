"""Tree-sitter token classification: text -> spans of TokenClass.

The tree is walked once with a cursor. Leaves are classified by node type (and,
for identifiers, by the parent and the field they sit in); string and comment
nodes are classified whole or in "string mode". Bytes no leaf covers become
whitespace, or the enclosing literal's class, or OTHER. Byte offsets are turned
into character offsets at the end, and the result covers the text exactly once.
"""

from __future__ import annotations

import bisect
import functools
import re
from itertools import accumulate

from .classes import Span, TokenClass
from .errors import CodeSignalsError
from .languages import get_parser, normalize_language
from .lexical import DEFINING_KEYWORDS, KEYWORDS, classify_lexical

# Past this size parsing is skipped and the lexical classifier is used: tree-sitter
# copes, but the walk would hold hundreds of MB of spans for little benefit.
MAX_PARSE_CHARS = 8_000_000

T = TokenClass
_PUNCT = frozenset(
    ["(", ")", "[", "]", "{", "}", ",", ";", ":", "${", "#[", "#![", "</", "/>", "::"]
) - {"::"}
_WORDLIKE = re.compile(r"#?[A-Za-z_][A-Za-z_0-9]*\Z")
_NUMBER_TYPE = re.compile(
    r"integer|float|number|decimal|hex_|octal|binary_int|int_literal|imaginary"
)
_STRING_TYPE = re.compile(
    r"string$|string_literal|char_literal|character_literal|rune_literal|regex|text_block|jsx_text|heredoc"
)
_COMMENT_TYPES = frozenset({"comment", "line_comment", "block_comment"})
_INTERPOLATION_TYPES = frozenset(
    {"interpolation", "template_substitution", "format_expression"}
)

# Identifier in one of these fields of a parent matching _DEF_PARENT is being defined.
_DEF_FIELDS = frozenset(
    {"name", "declarator", "pattern", "property", "parameter", "alias"}
)
_DEF_PARENT = re.compile(
    r"definition|declaration|declarator|_item$|_spec$|specifier|parameter|signature|variant|enum_assignment"
    r"|aliased_import|as_pattern"
)
# The `left` side of these binds names.
_BINDING_LEFT = frozenset(
    {
        "assignment",
        "for_statement",
        "for_in_clause",
        "for_in_statement",
        "short_var_declaration",
        "assignment_pattern",
        "range_clause",
        "augmented_assignment",
    }
)
# Direct identifier children of these are parameters or destructured names.
_BINDING_CONTAINERS = frozenset(
    {
        "parameters",
        "lambda_parameters",
        "formal_parameters",
        "typed_parameter",
        "list_splat_pattern",
        "dictionary_splat_pattern",
        "pattern_list",
        "tuple_pattern",
        "list_pattern",
        "array_pattern",
        "object_pattern",
        "rest_pattern",
        "expression_list",
        "as_pattern_target",
        "identifier_list",
        "pointer_declarator",
        "reference_declarator",
        "array_declarator",
        "mut_pattern",
        "ref_pattern",
        "parenthesized_expression",
        "tuple",
        "list",
    }
)
# Binding context survives into these (destructuring); other node types reset it.
_BINDING_PASS = _BINDING_CONTAINERS - {
    "parameters",
    "lambda_parameters",
    "formal_parameters",
    "typed_parameter",
}

_NORMAL, _STRING, _DOC = 0, 1, 2
_new_span = tuple.__new__  # Span(...) without the NamedTuple constructor's overhead

# Error recovery sometimes turns a keyword into an identifier (`return` in a broken
# block); inside ERROR regions such names count as keywords. Soft keywords that
# are often real names are left out.
_ERROR_KEYWORDS = KEYWORDS - {
    "self",
    "type",
    "match",
    "default",
    "union",
    "module",
    "package",
}


def classify(text: str, language: str | None) -> list[Span]:
    """Classify every character of `text`. Unknown languages (or ones without an
    installed grammar) use the lexical classifier; broken code still classifies,
    with spans inside ERROR regions flagged `in_error`."""
    if not isinstance(text, str):
        raise CodeSignalsError(f"classify() needs str text, got {type(text).__name__}")
    if not text:
        return []
    lang = normalize_language(language)
    parser = get_parser(lang) if lang and len(text) <= MAX_PARSE_CHARS else None
    if parser is None:
        return classify_lexical(text)
    data = text.encode("utf-8", "surrogatepass")  # lone surrogates must not crash
    tree = parser.parse(data)
    raw, literal_ranges = _walk(tree, data, lang)
    return _assemble(text, data, raw, literal_ranges)


def _walk(tree, data: bytes, lang: str):
    """Leaf spans (byte offsets, in order) and the byte ranges of string/docstring
    nodes (so that uncovered bytes inside them keep the literal's class)."""
    out: list[tuple[int, int, int, bool]] = []
    literal_ranges: list[tuple[int, int, int]] = []
    cursor = tree.walk()
    # One entry per ancestor of the cursor's node: (type, mode, in_error, binding, doc_parent)
    stack: list[tuple[str, int, bool, bool, bool]] = []
    parent = ("", _NORMAL, False, False, False)
    prev_keyword = ""
    python = lang == "python"
    while True:
        node = cursor.node
        ntype = node.type
        ptype, mode, in_error, binding, doc_parent = parent
        sb, eb = node.start_byte, node.end_byte
        descend = False
        if ntype == "ERROR":
            in_error = True
        if ntype in _COMMENT_TYPES:
            out.append((sb, eb, _comment_class(data, sb), in_error))
        elif ntype == "preproc_arg":  # macro body: no tree, classify it lexically
            for s in classify_lexical(data[sb:eb].decode("utf-8", "surrogatepass")):
                out.append(
                    (sb + s.start, sb + s.end, s.cls, in_error)
                )  # fixed up in _assemble
        elif node.child_count:
            descend = True
        elif eb > sb:
            if mode != _NORMAL:
                cls = T.DOCSTRING if mode == _DOC else T.STRING
            elif (
                not node.is_named
            ):  # punctuation, operators, keywords: decided by type alone
                cls = _ANON_CACHE.get(ntype)
                if cls is None:
                    cls = _ANON_CACHE[ntype] = _anonymous_class(ntype)
            else:
                cls = _named_leaf_class(
                    ntype, ptype, cursor.field_name, binding, prev_keyword, data, sb, eb
                )
            if (
                in_error
                and cls == T.IDENTIFIER_USE
                and data[sb:eb].decode("utf-8", "replace") in _ERROR_KEYWORDS
            ):
                cls = T.KEYWORD
            prev_keyword = ntype if cls == T.KEYWORD else ""
            out.append((sb, eb, cls, in_error))
        if descend:
            new_mode = mode
            if ntype in _INTERPOLATION_TYPES:
                new_mode = _NORMAL
                if mode != _NORMAL:
                    literal_ranges.append((sb, eb, None))
            elif mode == _NORMAL and _is_string_type(ntype) and node.is_named:
                new_mode = (
                    _DOC if doc_parent and python and ntype == "string" else _STRING
                )
                literal_ranges.append(
                    (sb, eb, T.DOCSTRING if new_mode == _DOC else T.STRING)
                )
            field = cursor.field_name
            new_binding = (
                (field == "left" and ptype in _BINDING_LEFT)
                or (field in _DEF_FIELDS and _is_def_parent(ptype))
                or (binding and ntype in _BINDING_PASS)
            )
            new_doc = (
                python
                and ntype == "expression_statement"
                and _first_statement(node, ptype)
            )
            stack.append(parent)
            parent = (ntype, new_mode, in_error, new_binding, new_doc)
            cursor.goto_first_child()
            continue
        while not cursor.goto_next_sibling():
            if not cursor.goto_parent():
                return out, literal_ranges
            parent = stack.pop()


_ANON_CACHE: dict[str, TokenClass] = {}


def _anonymous_class(ntype: str) -> TokenClass:
    if _WORDLIKE.match(ntype):
        return T.KEYWORD
    return T.PUNCTUATION if ntype in _PUNCT else T.OPERATOR


@functools.lru_cache(maxsize=4096)
def _is_string_type(ntype: str) -> bool:
    return bool(_STRING_TYPE.search(ntype)) and ntype != "concatenated_string"


@functools.lru_cache(maxsize=4096)
def _is_def_parent(ptype: str) -> bool:
    return bool(_DEF_PARENT.search(ptype))


def _named_leaf_class(
    ntype, ptype, field, binding, prev_keyword, data, sb, eb
) -> TokenClass:
    if ntype == "ERROR":
        return T.ERROR
    if "identifier" in ntype:
        if (
            _is_definition(ntype, ptype, field, binding)
            or prev_keyword in DEFINING_KEYWORDS
        ):
            return T.IDENTIFIER_DEF
        return T.IDENTIFIER_USE
    if _NUMBER_TYPE.search(ntype):
        return T.NUMBER
    if _STRING_TYPE.search(ntype):
        return T.STRING
    word = data[sb:eb]
    if _WORDLIKE.match(word.decode("utf-8", "replace")):  # none/true/this/self/auto/i32
        return T.KEYWORD
    if not any(
        c.isalnum() for c in word.decode("utf-8", "replace")
    ):  # ?. !r and similar
        return T.OPERATOR
    return T.OTHER


def _is_definition(ntype: str, ptype: str, field: str | None, binding: bool) -> bool:
    if ntype.endswith("_pattern"):  # JS `{ a } = obj` shorthand destructuring
        return True
    if field in _DEF_FIELDS and _is_def_parent(ptype):
        return True
    if field == "left" and ptype in _BINDING_LEFT:
        return True
    if (
        field is None
        and ptype in _BINDING_CONTAINERS
        and ptype
        not in ("parenthesized_expression", "tuple", "list", "expression_list")
    ):
        return True
    return binding and ptype in _BINDING_PASS


def _comment_class(data: bytes, sb: int) -> int:
    head = data[sb : sb + 4]
    if (head.startswith(b"/**") and not head.startswith(b"/**/")) or head[:3] in (
        b"///",
        b"//!",
        b"/*!",
    ):
        return T.DOCSTRING
    return T.COMMENT


def _first_statement(node, ptype: str) -> bool:
    """A Python expression statement that opens a module, class or function body."""
    if ptype == "module":
        pass
    elif ptype == "block":
        owner = node.parent.parent if node.parent is not None else None
        if owner is None or owner.type not in (
            "function_definition",
            "class_definition",
        ):
            return False
    else:
        return False
    prev = node.prev_named_sibling
    while prev is not None and prev.type == "comment":
        prev = prev.prev_named_sibling
    return prev is None


def _assemble(text: str, data: bytes, raw, literal_ranges) -> list[Span]:
    """Character-offset spans covering `text` exactly once, gaps filled."""
    if len(data) != len(text):  # not ASCII: map byte offsets to character offsets
        starts = list(
            accumulate(
                (len(c.encode("utf-8", "surrogatepass")) for c in text), initial=0
            )
        )

        def to_char(b: int) -> int:  # a byte inside a character maps to that character
            return bisect.bisect_right(starts, b) - 1

        raw = [(to_char(sb), to_char(eb), cls, err) for sb, eb, cls, err in raw]
        literal_ranges = [
            (to_char(sb), to_char(eb), cls) for sb, eb, cls in literal_ranges
        ]

    literals = _LiteralTracker(literal_ranges)
    spans: list[Span] = []
    pos = 0
    n = len(text)
    for start, end, cls, err in raw:
        end = min(end, n)
        if end <= pos:
            continue
        if start > pos:
            if (
                literals.idle(pos) and text[pos:start].isspace()
            ):  # the common gap: plain whitespace
                spans.append(_new_span(Span, (pos, start, T.WHITESPACE, False)))
            else:
                _fill_gap(text, pos, start, spans, literals.class_at(pos))
        start = max(start, pos)
        spans.append(_new_span(Span, (start, end, cls, err)))
        pos = end
    if pos < n:
        _fill_gap(text, pos, n, spans, literals.class_at(pos))
    return spans


class _LiteralTracker:
    """Answers "which literal (string/docstring, or an interpolation inside one)
    most tightly encloses offset p" for increasing p. Ranges come in pre-order."""

    def __init__(self, ranges):
        self.ranges = ranges
        self.next = 0
        self.open: list[tuple[int, int, int | None]] = []

    def idle(self, p: int) -> bool:
        """True when p is outside every literal (cheap check)."""
        return not self.open and (
            self.next == len(self.ranges) or self.ranges[self.next][0] > p
        )

    def class_at(self, p: int):
        if not self.open and (
            self.next == len(self.ranges) or self.ranges[self.next][0] > p
        ):
            return None  # the common case: outside every literal
        while self.next < len(self.ranges) and self.ranges[self.next][0] <= p:
            self.open.append(self.ranges[self.next])
            self.next += 1
        self.open = [r for r in self.open if r[1] > p]  # few are ever open at once
        return self.open[-1][2] if self.open else None


def _fill_gap(text, start, end, spans, literal_cls) -> None:
    """Uncovered characters take the enclosing literal's class; elsewhere
    whitespace runs are WHITESPACE and the rest OTHER."""
    if literal_cls is not None:
        spans.append(Span(start, end, TokenClass(literal_cls)))
        return
    if text[start:end].isspace():
        spans.append(Span(start, end, T.WHITESPACE))
        return
    for m in re.finditer(r"\s+|\S+", text[start:end]):
        cls = T.WHITESPACE if m.group()[0].isspace() else T.OTHER
        spans.append(Span(start + m.start(), start + m.end(), cls))
