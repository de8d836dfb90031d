"""code_signals: text -> token classes, importance weights, training examples.

Pure Python + tree-sitter (no torch). See docs/code_signals.md.
"""

from .align import ALIGN_PRIORITY, align_to_tokens, align_with_errors
from .classes import Span, TokenClass, is_keyword_or_identifier
from .classify import classify
from .edits import (
    EDIT_TYPES,
    Change,
    EditCoalescer,
    apply_range_edits,
    changed_regions,
    classify_edit_type,
    is_whitespace_only,
)
from .errors import CodeSignalsError
from .examples import ExampleBuilder, TrainingExample
from .languages import LANGUAGES, detect_language, has_grammar
from .lexical import classify_lexical
from .prompts import FIM_TOKENS
from .walker import (
    RepoFile,
    RepoScan,
    chunk_ranges,
    chunk_source,
    read_text_file,
    walk_repository,
)
from .weights import DEFAULT_WEIGHTS, token_weights

__all__ = [
    "ALIGN_PRIORITY",
    "DEFAULT_WEIGHTS",
    "EDIT_TYPES",
    "FIM_TOKENS",
    "LANGUAGES",
    "Change",
    "CodeSignalsError",
    "EditCoalescer",
    "ExampleBuilder",
    "RepoFile",
    "RepoScan",
    "Span",
    "TokenClass",
    "TrainingExample",
    "align_to_tokens",
    "align_with_errors",
    "apply_range_edits",
    "changed_regions",
    "chunk_ranges",
    "chunk_source",
    "classify",
    "classify_edit_type",
    "classify_lexical",
    "detect_language",
    "has_grammar",
    "is_keyword_or_identifier",
    "is_whitespace_only",
    "read_text_file",
    "token_weights",
    "walk_repository",
]
