"""Sentence ends in prose and in code's comments and docstrings (where AnLLM-AC inserts ``<AC>``).

The AnLLM paper splits with NLTK punkt, whose model is a download we cannot make at run time, and
which knows nothing of code. These rules work on both (offsets are character positions right after
a sentence's last character):

1. terminal punctuation ``. ! ?`` (closing quotes / brackets included) followed by whitespace or
   the end of the text; not after a common abbreviation (``e.g.``, ``Dr.``), a single capital
   (an initial), a list number at the start of a line (``1.``), nor a doctest continuation
   (``...`` at the start of a line); so ``x.y`` and ``3.14`` in code are never ends;
2. a blank line closes the open sentence (a paragraph, or a block of code, ends there);
3. the closing quotes of a docstring close the sentence inside it;
4. the last line of a block of ``#`` comment lines closes the sentence it holds.

A sentence holds at least one letter or digit outside special tokens; an offset is never repeated.
Punctuation followed by a special token's ``<|`` (``Sort it.<|im_end|>``) ends a sentence as
whitespace would.
"""

from __future__ import annotations

import re

ABBREVIATIONS = frozenset(
    "e.g i.e etc vs cf al fig figs eq eqs no nos approx resp mr mrs ms dr prof st jr sr inc ltd co dept".split()
)
TERMINAL = re.compile(r"[.!?]+[\"')\]]*(?=\s|$|<\|)")  # "<|": a special token such as <|im_end|>
WORD_BEFORE = re.compile(r"([A-Za-z0-9.]+)$")
SPECIAL_TOKEN = re.compile(r"<\|[^|<>]*\|>")  # chat-template markers are not sentence text
TRIPLE_QUOTE = re.compile(r"\"\"\"|'''")


def _is_sentence_end(text: str, match: re.Match) -> bool:
    start = match.start()
    line_start = text.rfind("\n", 0, start) + 1
    before_on_line = text[line_start:start]
    if not before_on_line.strip():  # "..." doctest continuation, or punctuation alone on a line
        return False
    if match.group().startswith(".") and not match.group().startswith(".."):
        word = WORD_BEFORE.search(before_on_line)
        if word:
            token = word.group(1).rstrip(".")
            if token.lower() in ABBREVIATIONS:
                return False
            if len(token) == 1 and token.isupper():  # an initial: "J. Smith"
                return False
            if token.isdigit() and not before_on_line[: word.start()].strip():  # "1. " list item
                return False
    return True


def _after_last_text(text: str, index: int) -> int:
    """Offset right after the last non-space character before ``index``."""
    while index > 0 and text[index - 1].isspace():
        index -= 1
    return index


def sentence_ends(text: str) -> list[int]:
    """Offsets right after the last character of every sentence in ``text``, ascending."""
    candidates: set[int] = set()
    for match in TERMINAL.finditer(text):
        if _is_sentence_end(text, match):
            candidates.add(match.end())
    # 2. blank lines: close at the last non-space character before them
    for match in re.finditer(r"\r?\n[ \t]*\r?\n", text):
        candidates.add(_after_last_text(text, match.start()))
    # 3. a docstring's closing quotes (every second triple quote)
    for k, match in enumerate(TRIPLE_QUOTE.finditer(text)):
        if k % 2 == 1:
            candidates.add(_after_last_text(text, match.start()))
    # 4. the last line of a block of full-line comments
    lines = text.split("\n")
    offset = 0
    for i, line in enumerate(lines):
        is_comment = line.lstrip().startswith("#")
        next_is_comment = i + 1 < len(lines) and lines[i + 1].lstrip().startswith("#")
        if is_comment and not next_is_comment:
            candidates.add(offset + len(line.rstrip()))
        offset += len(line) + 1
    # keep offsets that close a sentence with some text in it (not just quotes or brackets)
    ends, previous = [], 0
    for end in sorted(candidates):
        if end > previous and any(c.isalnum() for c in SPECIAL_TOKEN.sub("", text[previous:end])):
            ends.append(end)
            previous = end
    return ends


def insert_after_sentences(text: str, marker: str) -> str:
    """``text`` with ``marker`` right after every sentence."""
    pieces, previous = [], 0
    for end in sentence_ends(text):
        pieces += [text[previous:end], marker]
        previous = end
    pieces.append(text[previous:])
    return "".join(pieces)
