"""Token classification on real snippets of each language."""

from __future__ import annotations

import pytest

from code_signals import (
    LANGUAGES,
    Span,
    TokenClass,
    classify,
    detect_language,
    has_grammar,
    is_keyword_or_identifier,
)

T = TokenClass

SNIPPETS = {
    "python": '''#!/usr/bin/env python3
"""Module doc."""
import os

class Point(Base):
    """A point."""
    def norm(self, scale=2.5):
        total = self.x ** 2  # square
        return f"n={total}" if scale else None
''',
    "javascript": """/** Adds. */
function add(x, y = 2) {
  const s = `sum ${x + y}`;
  return x !== null ? s : 0x1f; // done
}
""",
    "typescript": """interface Shape { area(): number }
export function scale<T extends Shape>(s: T, k: number = 1): number {
  return s.area() * k;
}
""",
    "tsx": """export const Hello = ({ name }: { name: string }) => <div className="x">Hi {name}</div>;
""",
    "java": """public class Greeter {
    /** Says hi. */
    public String greet(String name, int times) {
        for (int i = 0; i < times; i++) { name += "!"; }
        return name; // result
    }
}
""",
    "go": """package main

// Point is a point.
type Point struct{ X int }

func (p *Point) Add(q Point) int {
	sum := p.X + q.X
	return sum * 3
}
""",
    "rust": """/// A point.
pub struct Point { x: i32 }
fn main() {
    let (a, b) = (1u8, 2.5);
    if a > 0 { println!("{}", a); } // print
}
""",
    "c": """#include <stdio.h>
/* adds */
static int add(int a, const char *name) {
    int total = a + 10;
    printf("%s\\n", name);
    return total;
}
""",
    "cpp": """namespace geo {
template <typename T>
class Box {
public:
    T get() const { return value_; }  // getter
private:
    T value_;
};
}
""",
}


def classes_of(text: str, language: str) -> dict[str, set[TokenClass]]:
    """Each distinct span text -> the classes it got (a name may be def and use)."""
    out: dict[str, set[TokenClass]] = {}
    for span in classify(text, language):
        out.setdefault(text[span.start : span.end], set()).add(span.cls)
    return out


def check_cover(text: str, spans: list[Span]) -> None:
    pos = 0
    for span in spans:
        assert span.start == pos and span.end > span.start, (span, pos)
        pos = span.end
    assert pos == len(text)


@pytest.mark.parametrize("language", LANGUAGES)
def test_grammar_available_and_cover(language):
    assert has_grammar(language), f"no tree-sitter grammar for {language}"
    text = SNIPPETS[language]
    spans = classify(text, language)
    check_cover(text, spans)
    assert not any(s.in_error for s in spans), "valid snippet parsed with errors"


EXPECTED = {
    "python": {
        "#!/usr/bin/env python3": T.COMMENT,
        "Module doc.": T.DOCSTRING,
        "A point.": T.DOCSTRING,
        "import": T.KEYWORD,
        "class": T.KEYWORD,
        "def": T.KEYWORD,
        "return": T.KEYWORD,
        "None": T.KEYWORD,
        "Point": T.IDENTIFIER_DEF,
        "norm": T.IDENTIFIER_DEF,
        "scale": None,
        "total": None,
        "Base": T.IDENTIFIER_USE,
        "os": T.IDENTIFIER_USE,
        "**": T.OPERATOR,
        "=": T.OPERATOR,
        "2.5": T.NUMBER,
        "2": T.NUMBER,
        "# square": T.COMMENT,
        "n=": T.STRING,
        "(": T.PUNCTUATION,
    },
    "javascript": {
        "/** Adds. */": T.DOCSTRING,
        "function": T.KEYWORD,
        "const": T.KEYWORD,
        "null": T.KEYWORD,
        "add": T.IDENTIFIER_DEF,
        "s": None,
        "x": None,
        "sum ": T.STRING,
        "0x1f": T.NUMBER,
        "!==": T.OPERATOR,
        "// done": T.COMMENT,
        ";": T.PUNCTUATION,
    },
    "typescript": {
        "interface": T.KEYWORD,
        "number": T.KEYWORD,
        "extends": T.KEYWORD,
        "Shape": None,
        "scale": T.IDENTIFIER_DEF,
        "k": None,
        "*": T.OPERATOR,
        "1": T.NUMBER,
        "area": None,
    },
    "tsx": {
        "const": T.KEYWORD,
        "Hello": T.IDENTIFIER_DEF,
        "x": T.STRING,
        "string": T.KEYWORD,
        "=>": T.OPERATOR,
    },
    "java": {
        "public": T.KEYWORD,
        "class": T.KEYWORD,
        "int": T.KEYWORD,
        "Greeter": T.IDENTIFIER_DEF,
        "greet": T.IDENTIFIER_DEF,
        "String": T.IDENTIFIER_USE,
        "/** Says hi. */": T.DOCSTRING,
        "// result": T.COMMENT,
        "!": T.STRING,
        "0": T.NUMBER,
        "++": T.OPERATOR,
        "+=": T.OPERATOR,
    },
    "go": {
        "package": T.KEYWORD,
        "func": T.KEYWORD,
        "type": T.KEYWORD,
        "struct": T.KEYWORD,
        "Add": T.IDENTIFIER_DEF,
        "// Point is a point.": T.COMMENT,
        ":=": T.OPERATOR,
        "3": T.NUMBER,
        "sum": None,
    },
    "rust": {
        "/// A point.\n": T.DOCSTRING,
        "pub": T.KEYWORD,
        "struct": T.KEYWORD,
        "fn": T.KEYWORD,
        "let": T.KEYWORD,
        "i32": T.KEYWORD,
        "main": T.IDENTIFIER_DEF,
        "Point": T.IDENTIFIER_DEF,
        "1u8": T.NUMBER,
        "2.5": T.NUMBER,
        "{}": T.STRING,
        "// print": T.COMMENT,
        ">": T.OPERATOR,
    },
    "c": {
        "#include": T.KEYWORD,
        "<stdio.h>": T.STRING,
        "/* adds */": T.COMMENT,
        "static": T.KEYWORD,
        "int": T.KEYWORD,
        "char": T.KEYWORD,
        "add": T.IDENTIFIER_DEF,
        "name": None,
        "printf": T.IDENTIFIER_USE,
        "10": T.NUMBER,
        "\\n": T.STRING,
        "+": T.OPERATOR,
    },
    "cpp": {
        "namespace": T.KEYWORD,
        "template": T.KEYWORD,
        "typename": T.KEYWORD,
        "class": T.KEYWORD,
        "public": T.KEYWORD,
        "const": T.KEYWORD,
        "Box": T.IDENTIFIER_DEF,
        "get": T.IDENTIFIER_DEF,
        "value_": None,
        "// getter": T.COMMENT,
    },
}

# Names that are defined in the snippet and used later: both classes must show up.
DEF_AND_USE = {
    "python": ["scale", "total"],
    "javascript": ["s", "x"],
    "typescript": ["k"],
    "go": ["sum"],
    "c": ["name"],
    "cpp": ["value_"],
}


@pytest.mark.parametrize("language", LANGUAGES)
def test_concrete_classes(language):
    got = classes_of(SNIPPETS[language], language)
    for token, cls in EXPECTED[language].items():
        assert token in got, (
            f"{token!r} not a span of its own in {language}: {sorted(got)}"
        )
        if cls is not None:
            assert got[token] == {cls}, (
                f"{language}: {token!r} got {got[token]}, wanted {cls}"
            )
    for name in DEF_AND_USE.get(language, []):
        assert got[name] == {T.IDENTIFIER_DEF, T.IDENTIFIER_USE}, (
            language,
            name,
            got[name],
        )


def test_typescript_interface_and_use():
    got = classes_of(SNIPPETS["typescript"], "typescript")
    assert got["Shape"] == {T.IDENTIFIER_DEF, T.IDENTIFIER_USE}
    assert got["area"] == {
        T.IDENTIFIER_DEF,
        T.IDENTIFIER_USE,
    }  # declared in interface, called below


def test_broken_code_still_classifies_with_error_flag():
    text = "class A:\n    def m(self, x\n        return x +\n"
    spans = classify(text, "python")
    check_cover(text, spans)
    got = classes_of(text, "python")
    assert (
        got["class"] == {T.KEYWORD}
        and got["def"] == {T.KEYWORD}
        and got["return"] == {T.KEYWORD}
    )
    assert (
        T.IDENTIFIER_DEF in got["m"]
    )  # a name after `def` is a definition even inside ERROR
    assert any(s.in_error for s in spans)


def test_junk_characters_are_error_class():
    text = "def f(:\n  $$$ x = 1\n"
    got = classes_of(text, "python")
    assert got["$$$"] == {T.ERROR}


def test_non_ascii_offsets_are_characters():
    text = 's = "héllo 🎉"\nnaïve = s  # ünïcode\n'
    spans = classify(text, "python")
    check_cover(text, spans)
    got = classes_of(text, "python")
    assert got["naïve"] == {T.IDENTIFIER_DEF}
    assert got["# ünïcode"] == {T.COMMENT}
    assert got["héllo 🎉"] == {T.STRING}


def test_unknown_language_falls_back_to_lexical():
    text = "fn main() { let x = 42; } // hi\n# note\n"
    spans = classify(text, "some-unknown-language")
    check_cover(text, spans)
    got = classes_of(text, "text")
    assert got["let"] == {T.KEYWORD}
    assert got["x"] == {T.IDENTIFIER_DEF}
    assert got["42"] == {T.NUMBER}
    assert got["// hi"] == {T.COMMENT}
    assert got["# note"] == {T.COMMENT}


def test_empty_and_whitespace():
    assert classify("", "python") == []
    assert classify("   \n\t", "go") == [Span(0, 5, T.WHITESPACE)]


def test_bad_text_type():
    from code_signals import CodeSignalsError

    with pytest.raises(CodeSignalsError):
        classify(b"bytes", "python")


def test_keyword_or_identifier_helper():
    assert is_keyword_or_identifier(T.KEYWORD)
    assert is_keyword_or_identifier(T.IDENTIFIER_DEF) and is_keyword_or_identifier(
        T.IDENTIFIER_USE
    )
    assert not is_keyword_or_identifier(T.STRING) and not is_keyword_or_identifier(
        T.WHITESPACE
    )


@pytest.mark.parametrize(
    "path, text, explicit, expected",
    [
        ("a/b.py", None, None, "python"),
        ("x.tsx", None, None, "tsx"),
        ("x.ts", None, None, "typescript"),
        ("x.jsx", None, None, "javascript"),
        ("M.java", None, None, "java"),
        ("m.go", None, None, "go"),
        ("lib.rs", None, None, "rust"),
        ("a.c", None, None, "c"),
        ("a.cc", None, None, "cpp"),
        ("a.h", "int f(void);", None, "c"),
        ("a.h", "namespace x { class A; }", None, "cpp"),
        ("script", "#!/usr/bin/env python3\nprint(1)\n", None, "python"),
        ("run", "#!/usr/bin/node\n", None, "javascript"),
        ("x.py", None, "typescriptreact", "tsx"),
        ("README.md", None, "markdown", "text"),
        (None, None, None, "text"),
        ("Makefile", "all:\n", None, "text"),
    ],
)
def test_detect_language(path, text, explicit, expected):
    assert detect_language(path, text, explicit) == expected
