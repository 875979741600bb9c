"""The evidence a prototype's label is read from: the taxonomy, the form of a trigger token in
its snippet, the source topics and the distinctive words near a neighbourhood's triggers.

:mod:`core.atlas.labels` combines these into a category, a role and a description.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from core.index.format import PrototypeIndex

CATEGORIES: dict[str, str] = {
    # Structural: what kind of token the prototype fires on, whatever the text is about.
    "numbers & dates": "fires on digits, numbers, years, versions, times, months and weekdays",
    "morphology & subwords": "fires inside words: the next token continues the word (stems, prefixes, pieces)",
    "grammar & function words": "fires on function words: articles, pronouns, prepositions, auxiliaries",
    "punctuation & layout": "fires on punctuation, whitespace, line breaks and markup",
    "names": "fires on proper names and acronyms: capitalised words mid-sentence, words in capitals",
    # Topical: what the text is about, from the demo corpus's sources.
    "literature & drama": "Shakespeare's plays and poems: verse, dialogue, speakers, stage directions",
    "dictionary definitions": "WordNet glosses: headwords, parts of speech and definitions",
    "software packaging": "Debian package descriptions: package names, sections, features",
    "Python documentation": "Python standard-library docs: signatures, modules, parameters",
    "quotations & humour": "fortune cookies: quotations, jokes, attributions",
    # Fallbacks.
    "mixed": "content words with no form or source holding half of the neighbourhood",
    "unused": "never active on the indexed training data (a dead prototype)",
}


SOURCE_TOPICS: dict[str, str] = {
    "shakespeare": "literature & drama",
    "wordnet": "dictionary definitions",
    "debian": "software packaging",
    "pydoc": "Python documentation",
    "fortunes": "quotations & humour",
}


FORM_CATEGORIES: dict[str, str] = {  # in order of precedence when shares tie
    "number": "numbers & dates",
    "subword": "morphology & subwords",
    "punctuation": "punctuation & layout",
    "function": "grammar & function words",
    "name": "names",
}


STRUCTURAL_SHARE = 0.5  # a form with at least this share of the neighbours names the category


TOPIC_SHARE = 0.5  # else a source with at least this share does


WINDOW_BEFORE, WINDOW_AFTER = 48, 16  # characters around a trigger read for distinctive words


MIN_WORD_SHARE = 0.15  # a distinctive word appears near at least this share of the neighbours


_MONTHS = {
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
    "jan",
    "feb",
    "mar",
    "apr",
    "jun",
    "jul",
    "aug",
    "sep",
    "sept",
    "oct",
    "nov",
    "dec",
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
}


_ARCHAIC = {
    "thou",
    "thee",
    "thy",
    "thine",
    "hath",
    "doth",
    "dost",
    "hast",
    "art",
    "ye",
    "shalt",
    "wilt",
    "tis",
    "o",
    "ay",
    "nay",
}


_FORM_NAMES = {
    "number": "numbers",
    "subword": "inside words",
    "punctuation": "punctuation",
    "function": "function words",
    "name": "names",
    "word": "content words",
}


_SENTENCE_START = set(".!?:;\"'([{*#-=>|%\n")


_NUMBER = re.compile(r"^\d+(?:st|nd|rd|th|s)?$|^\d+[.,:/-]?\d*$")


def display_token(text: str) -> str:
    """A token as people read it: stripped, with whitespace-only tokens spelled out."""
    if text.strip():
        return text.strip()
    return text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "␣") or "∅"


def token_form(snippet: str, start: int, end: int) -> tuple[str, str]:
    """The form of the trigger token ``snippet[start:end]`` and the text it is read as.

    Returns:
        (form, text): form is one of number, subword, punctuation, function, name, word;
        text is the whole word around the token (pieces: the token itself).
    """
    token = snippet[start:end]
    core = token.strip()
    if not any(c.isalnum() for c in core):
        return "punctuation", display_token(token)
    lo, hi = end, end
    while lo > 0 and snippet[lo - 1].isalnum():
        lo -= 1
    while hi < len(snippet) and snippet[hi].isalnum():
        hi += 1
    word = snippet[lo:hi]
    low = word.lower()
    digits = sum(c.isdigit() for c in word)
    if _NUMBER.match(word) or (low in _MONTHS and word[0].isupper()) or digits * 2 > len(word):  # "may": a verb
        return "number", word
    if core[0] == "'" and core[1:].isalpha():  # 's, 'll, 'd, 't: clitics and contractions
        return "function", core.lower()
    if hi == end and snippet[hi : hi + 2] in ("'t", "’t"):  # don't, isn't, can't: negated auxiliaries
        return "function", low + "'t"
    if hi > end and (snippet[end].isalpha() or core[-1].isdigit()):  # the next character continues the word
        return "subword", core
    if low in _ARCHAIC or low in _stop_words():
        return "function", low
    before = snippet[:lo].rstrip(" \t")
    sentence_start = not before or before[-1] in _SENTENCE_START
    if word[:1].isupper() and ((word.isupper() and len(word) >= 2) or not sentence_start):
        return "name", word
    return "word", word


def _stop_words() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return ENGLISH_STOP_WORDS


def topic_for_source(source: str) -> str:
    """The topical category of a corpus source."""
    return SOURCE_TOPICS.get(source, source)


def _neighbour_rows(index: PrototypeIndex) -> list[np.ndarray]:
    return [row[row >= 0] for row in index.neighbour_row]


def _trigger_window(snippet: str, start: int, end: int) -> str:
    """The text around a trigger, without words cut in half at either edge."""
    lo, hi = max(0, start - WINDOW_BEFORE), min(len(snippet), end + WINDOW_AFTER)
    while 0 < lo < start and snippet[lo - 1].isalnum() and snippet[lo].isalnum():
        lo += 1
    while end < hi < len(snippet) and snippet[hi - 1].isalnum() and snippet[hi].isalnum():
        hi -= 1
    return snippet[lo:hi]


def _distinctive_words(index: PrototypeIndex, rows: list[np.ndarray], top: int = 4) -> list[list[str]]:
    """Per prototype, its most distinctive words near the triggers.

    Class-based tf-idf: the "term frequency" of word w for prototype j is the share of j's
    neighbours with w in their trigger window (kept when at least MIN_WORD_SHARE); the
    "documents" are the P neighbourhoods, so a word near the triggers of many prototypes
    (such as "noun" across the dictionary) scores low and one only j has scores high.
    """
    from scipy import sparse
    from sklearn.feature_extraction.text import CountVectorizer, TfidfTransformer

    windows = [_trigger_window(s["snippet"], s["start"], s["end"]) for s in index.snippets]
    vectorizer = CountVectorizer(
        stop_words="english", token_pattern=r"(?u)\b[^\W\d_]{3,}\b", binary=True, dtype=np.float64
    )
    try:
        X = vectorizer.fit_transform(windows).tocsr()  # (R, V) 1 where the word occurs in the window
    except ValueError:  # not one word in any window
        return [[] for _ in rows]
    vocab = vectorizer.get_feature_names_out()
    P = len(rows)
    counts = np.array([len(r) for r in rows], dtype=np.int64)
    data = np.concatenate([np.full(len(r), 1.0 / max(1, len(r))) for r in rows])
    indptr = np.concatenate([[0], np.cumsum(counts)])
    assign = sparse.csr_matrix((data, np.concatenate(rows).astype(np.int64), indptr), shape=(P, X.shape[0]))
    share = (assign @ X).tocsr()  # (P, V) share of j's neighbours with the word
    share.data[share.data < MIN_WORD_SHARE] = 0.0
    share.eliminate_zeros()
    score = TfidfTransformer(norm=None, smooth_idf=True).fit_transform(share).tocsr()  # (P, V) share x idf
    result = []
    for j in range(P):
        row = score.getrow(j)
        order = np.lexsort((row.indices, -row.data))[:top]  # ties: alphabetical (vocab is sorted)
        result.append([str(vocab[row.indices[i]]) for i in order])
    return result


def _topical_role(forms: list[tuple[str, str]], words: list[str]) -> str:
    """Up to three words: the words it fires on when two of them cover a quarter of the
    neighbourhood, then its distinctive words."""
    fired = Counter(text.lower() for form, text in forms if form in ("word", "name"))
    top = fired.most_common(2)
    shown = [w for w, _ in top] if sum(c for _, c in top) * 4 >= max(1, len(forms)) else []
    shown += [w for w in words if w not in shown]
    if not shown:  # no word to go by: the tokens it fires on
        shown = [f"“{t}”" for t, _ in Counter(text for _, text in forms).most_common(2)]
    return ", ".join(shown[:3])
