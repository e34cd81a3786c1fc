"""Text from users (class names, metadata values, file paths) made safe where the toolkit writes it.

- CSV: a cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is a formula to a
  spreadsheet (``=HYPERLINK(...)``, ``=cmd|' /C calc'!A0``); :func:`csv_cell` prefixes such text with a single
  quote, as OWASP's "CSV injection" advice says, so it is shown as text. Numbers (and text that is a plain
  number, such as ``-0.5``) are left as they are. :func:`csv_writer` applies it to every cell of every row.
- Markdown: :func:`md_text` for table cells and running text (control characters become spaces, so a name
  cannot end a table row or start a heading; ``|``, brackets (links), backticks, ``*``, ``#`` and a ``_`` at a
  word's edge are backslash-escaped; ``<``, ``>``
  and ``&`` become HTML entities, so no tag is written raw); :func:`md_code` for a name shown as inline code.
"""

from __future__ import annotations

import csv
import re
import unicodedata
from typing import Any

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_MD_PUNCTUATION = re.compile(r"([\\`*\[\]#|]|(?<!\w)_|_(?!\w))")  # "_" inside a word is no emphasis
_LINE_BREAKS = {"\u2028", "\u2029", "\x85"}
_PLAIN_NAME = re.compile(r"[\w .,:/+()'-]+")


def csv_cell(value: Any) -> Any:
    """``value`` as a spreadsheet shows it literally: formula-like text gets a leading ``'``; numbers stay."""
    if not isinstance(value, str):
        return value
    if value.startswith(FORMULA_STARTS) and not _PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


class _EscapingWriter:
    """``csv.writer`` whose rows are escaped cell by cell (:func:`csv_cell`)."""

    def __init__(self, f: Any, **kwargs: Any) -> None:
        self._writer = csv.writer(f, **kwargs)

    def writerow(self, row: Any) -> Any:
        return self._writer.writerow([csv_cell(v) for v in row])

    def writerows(self, rows: Any) -> None:
        for row in rows:
            self.writerow(row)


def csv_writer(f: Any, **kwargs: Any) -> _EscapingWriter:
    """The writer every CSV of the toolkit is written with (predictions, per-class, subgroups, ...)."""
    return _EscapingWriter(f, **kwargs)


def _one_line(text: str) -> str:
    """Control characters and line breaks as spaces: the text stays on its table row or list item."""
    return "".join(
        " " if unicodedata.category(c) in ("Cc", "Cf") or c in _LINE_BREAKS else c for c in text
    )


def _entities(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def md_text(value: Any) -> str:
    """``value`` as literal Markdown text, safe in a table cell, a list item or a sentence."""
    return _MD_PUNCTUATION.sub(r"\\\1", _entities(_one_line(str(value))))


def md_code(value: Any) -> str:
    """A plain name (letters, digits, spaces and ``_ - . , : / + ( ) '``) as an inline code span; any other text
    as :func:`md_text`, so that nothing tag- or link-like is written even inside a code span, no span can be
    closed early and no ``|`` splits a table cell."""
    text = str(value)
    return f"`{text}`" if _PLAIN_NAME.fullmatch(text) else md_text(text)
