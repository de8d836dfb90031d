"""The one exception type of code_signals."""


class CodeSignalsError(ValueError):
    """Input that code_signals cannot use: binary or non-UTF-8 content, an edit
    whose range does not fit the document, a bad parameter. The message says which."""
