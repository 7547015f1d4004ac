"""A BM25 tokenizer for mixed prose and code.

Plain word tokenizers lose what makes code searchable: ``os.path.join`` becomes three
common words, ``readFileSync`` one opaque word. This tokenizer lowercases, splits on
non-alphanumerics, and additionally

* keeps a *compound* (``os.path.join``, ``snake_case``, ``File::Find``, ``--no-ff`` →
  ``no-ff``) as one token next to its parts, so an exact identifier matches strongly
  while its parts still match prose;
* splits *camelCase*/``PascalCase``/letter-digit runs (``readFileSync`` → ``readfilesync``,
  ``read``, ``file``, ``sync``; ``python3`` → ``python3``, ``python``, ``3``).

English stopwords and a light (plural-only) stemmer are options. Which defaults work
best is a measurement question (docs/retrieval.md), so every switch is a field of
:class:`TokenizerOptions`, which is also recorded in each index manifest: queries must
be tokenized exactly like the corpus they search.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["ENGLISH_STOPWORDS", "Tokenizer", "TokenizerOptions", "minimal_stem"]

# A compound is alphanumeric runs joined by '.', '_', '-' or '::' (the joiners of Python,
# JavaScript, shell options, Perl/C++/R namespaces). Leading/trailing joiners are not part
# of it, so a full stop at the end of a sentence never sticks to the last word.
_COMPOUND = re.compile(r"[^\W_]+(?:(?:[._\-]|::)+[^\W_]+)*")
_PART = re.compile(r"[^\W_]+")
# camelCase / PascalCase / acronym / digit boundaries: XMLHttpRequest -> XML Http Request.
# Applied to ASCII words only: for other scripts "case" boundaries are not identifiers.
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")

# NLTK's English stopword list (the common reference list) without its contractions: the
# tokenizer splits at apostrophes, so only their parts ("don", "t") ever occur.
ENGLISH_STOPWORDS: frozenset[str] = frozenset(
    (
        "i",
        "me",
        "my",
        "myself",
        "we",
        "our",
        "ours",
        "ourselves",
        "you",
        "your",
        "yours",
        "yourself",
        "yourselves",
        "he",
        "him",
        "his",
        "himself",
        "she",
        "her",
        "hers",
        "herself",
        "it",
        "its",
        "itself",
        "they",
        "them",
        "their",
        "theirs",
        "themselves",
        "what",
        "which",
        "who",
        "whom",
        "this",
        "that",
        "these",
        "those",
        "am",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "have",
        "has",
        "had",
        "having",
        "do",
        "does",
        "did",
        "doing",
        "a",
        "an",
        "the",
        "and",
        "but",
        "if",
        "or",
        "because",
        "as",
        "until",
        "while",
        "of",
        "at",
        "by",
        "for",
        "with",
        "about",
        "against",
        "between",
        "into",
        "through",
        "during",
        "before",
        "after",
        "above",
        "below",
        "to",
        "from",
        "up",
        "down",
        "in",
        "out",
        "on",
        "off",
        "over",
        "under",
        "again",
        "further",
        "then",
        "once",
        "here",
        "there",
        "when",
        "where",
        "why",
        "how",
        "all",
        "any",
        "both",
        "each",
        "few",
        "more",
        "most",
        "other",
        "some",
        "such",
        "no",
        "nor",
        "not",
        "only",
        "own",
        "same",
        "so",
        "than",
        "too",
        "very",
        "s",
        "t",
        "can",
        "will",
        "just",
        "don",
        "should",
        "now",
        "d",
        "ll",
        "m",
        "o",
        "re",
        "ve",
        "y",
        "ain",
        "aren",
        "couldn",
        "didn",
        "doesn",
        "hadn",
        "hasn",
        "haven",
        "isn",
        "ma",
        "mightn",
        "mustn",
        "needn",
        "shan",
        "shouldn",
        "wasn",
        "weren",
        "won",
        "wouldn",
    )
)


def minimal_stem(word: str) -> str:
    """Strip English plural endings (Lucene's ``EnglishMinimalStemmer``, the "S-stemmer").

    Deliberately light: it only conflates singular and plural (``files`` → ``file``,
    ``queries`` → ``query``) and leaves ``process``, ``status``, ``does`` alone. Heavier
    stemmers (Porter) mangle identifiers, which matter here.

    Args:
        word: A lowercase token.

    Returns:
        The stem (``word`` itself when no rule applies).
    """
    n = len(word)
    if n < 3 or word[-1] != "s":
        return word
    before = word[-2]
    if before in "us":
        return word
    if before == "e":
        if n > 3 and word[-3] == "i" and word[-4] not in "ae":
            return word[:-3] + "y"
        if word[-3] in "iaoe":
            return word
    return word[:-1]


@dataclass(frozen=True, slots=True)
class TokenizerOptions:
    """Switches of :class:`Tokenizer`; recorded in index manifests.

    Attributes:
        stopwords: Drop English stopwords (:data:`ENGLISH_STOPWORDS`) from single words and
            identifier parts; compounds are always kept.
        stem: Apply :func:`minimal_stem` to purely alphabetic words and parts.
        compounds: Also emit each dotted/underscored/hyphenated compound as one token.
        camel_case: Also emit the camelCase/letter-digit parts of each word.
    """

    stopwords: bool = False
    stem: bool = False
    compounds: bool = True
    camel_case: bool = True

    def to_dict(self) -> dict[str, bool]:
        """JSON-ready form, as stored in manifests."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenizerOptions:
        """Inverse of :meth:`to_dict`; unknown keys are rejected, missing keys take defaults.

        Raises:
            ValueError: On an unknown key or a non-boolean value.
        """
        known = {"stopwords", "stem", "compounds", "camel_case"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown tokenizer options: {sorted(unknown)}")
        for key, value in data.items():
            if not isinstance(value, bool):
                raise ValueError(f"tokenizer option {key!r} must be a boolean, got {value!r}")
        return cls(**dict(data))


class Tokenizer:
    """Turns text into BM25 terms. Stateless apart from its options, so thread-safe.

    Example:
        >>> Tokenizer()("Call os.path.join() on fileNames")
        ['call', 'os.path.join', 'os', 'path', 'join', 'on', 'filenames', 'file', 'names']
    """

    __slots__ = ("_camel", "_compounds", "_options", "_stem", "_stopwords")

    def __init__(self, options: TokenizerOptions | None = None) -> None:
        self._options = options or TokenizerOptions()
        self._stopwords: frozenset[str] = ENGLISH_STOPWORDS if self._options.stopwords else frozenset()
        self._stem = self._options.stem
        self._compounds = self._options.compounds
        self._camel = self._options.camel_case

    @property
    def options(self) -> TokenizerOptions:
        """The options this tokenizer was built with."""
        return self._options

    def __call__(self, text: str) -> list[str]:
        """Tokenize ``text``.

        Returns:
            Lowercase terms in text order (a compound precedes its parts). Tokens are
            interned: a tokenized corpus shares one string object per distinct term,
            which keeps the corpus that sparse indexes hold for rebuilds small.
        """
        out: list[str] = []
        for match in _COMPOUND.finditer(text):
            token = match.group()
            if token.isalnum():
                self._word(token, out)
                continue
            if self._compounds:
                out.append(sys.intern(token.lower()))
            for part in _PART.findall(token):
                self._word(part, out)
        return out

    def _word(self, word: str, out: list[str]) -> None:
        self._emit(word.lower(), out)
        if self._camel and word.isascii() and not (word.islower() and word.isalpha()):
            pieces = _CAMEL.findall(word)
            if len(pieces) > 1:
                for piece in pieces:
                    self._emit(piece.lower(), out)

    def _emit(self, term: str, out: list[str]) -> None:
        if term in self._stopwords:
            return
        if self._stem and term.isalpha():
            term = minimal_stem(term)
        out.append(sys.intern(term))
