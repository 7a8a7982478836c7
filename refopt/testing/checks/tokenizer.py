r"""The tokenizer checks: the leading ``</s>``, special tokens written in text, every id of every
text, every byte value UTF-8 can carry in every context, and decoding.

``tokenizer.encode`` also encodes every whitespace run GPT-2's split regex treats by what follows it
(``\s+(?!\S)``: ``"\n\n"``, ``"  "``, ``"\t\n"``, ...) after 0 to 47 characters of words: a port
that cuts a text into pieces and pre-tokenizes each piece alone splits a run that ends a piece
otherwise, at the offsets where its cuts fall.  ``tokenizer.decode`` decodes the ids of every text,
and id lists no text encodes to: cut inside a multi-byte character (bytes that are not UTF-8, which
become U+FFFD, as when generation stops inside a character), holding ``<pad>`` and ``</s>`` (left
out) at the start, inside and at the end, and drawn at random from the whole vocabulary.  ``<s>``
and ``<unk>`` are not decoded: no text encodes to them, and the peers differ (transformers leaves
``<unk>`` out and writes ``<s>``, KerasHub writes both).

``tokenizer.bytes`` encodes one character for every byte value UTF-8 can hold (all of 00-7F, every
continuation byte 80-BF, every lead byte C2-DF, E0-EF, F0-F4: every UTF-8 length from 1 to 4) alone,
after a space, at the start of a word and inside a word -- the contexts GPT-2's pre-tokenizer treats
differently -- so a port that mishandles one byte (a wrong byte-to-symbol table entry, a whitespace
class that misses a control character) fails at that byte.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np

from refopt.testing.adapter import NotSupported, RefoptAdapter
from refopt.testing.checks.base import FAIL, PASS, Check, CheckResult

TEXTS = [
    "Hello world", "The quick brown fox jumped.", "  leading spaces and\ttabs\n\nnewlines ",
    "naïve café — 東京 🚀", "I'm sure it's they'll we've", "123 4567 3.14159", "",
    "Once upon a time", "unbelievable misunderstandings", "hello   world!!!  ", "a\r\nb",
    "Ünïcödé Ελληνικά русский العربية हिन्दी", "    ", "x" * 40, "The the THE tHe",
    "e-mail: someone@example.com, url https://example.org/a?b=c", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and emoji 👩‍👩‍👧‍👦",
]
SPECIAL_TEXTS = ["<pad> not special", "before</s>after", "</s>", "x <pad><pad> y", "<pad>",
                 "a </s> b <pad> c", "<s> and <unk> are written out"]
_POOL = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789     \n\t.,;:!?'\"-()"
         "éèüößñçøåæœ—–…«»€£¥§°±×÷αβγδλμπσωЖжЯя東京日本語中文한국어🚀🙂👍✨")


#: whitespace runs that GPT-2's pre-tokenizer splits by what follows them (``\s+(?!\S)``)
WHITESPACE_RUNS = ("\n\n", "  ", "   ", " \n", "\n ", "\t\n", "\r\n\r\n", "\n\n\n", "\t ")
_WORDS = "the quick brown fox jumps over a lazy dog, again and again and again"


def whitespace_texts(offsets: int = 48) -> list[str]:
    """Each of :data:`WHITESPACE_RUNS` after the first 0 to ``offsets - 1`` characters of a
    sentence and before a word, a digit or punctuation."""
    tails = ("word", "7", "!?")
    return [_WORDS[:k] + run + tails[k % 3] for run in WHITESPACE_RUNS for k in range(offsets)]


def random_texts(rng: np.random.Generator, n: int = 24, max_len: int = 40) -> list[str]:
    """Texts drawn from a pool of ASCII, punctuation, accented Latin, Greek, Cyrillic, CJK, Hangul
    and emoji, with words and whitespace runs of random lengths."""
    out = []
    for _ in range(n):
        length = int(rng.integers(0, max_len + 1))
        out.append("".join(_POOL[int(i)] for i in rng.integers(0, len(_POOL), length)))
    return out


class TokenizerCase:
    def __init__(self, vocabulary, merges, texts=None, seed: int = 0):
        self.vocabulary, self.merges = Path(vocabulary), Path(merges)
        self.texts = list(TEXTS if texts is None else texts) + random_texts(np.random.default_rng(seed))
        self.seed = seed
        self.reference = RefoptAdapter("numpy", "float64")
        self.reference.load_tokenizer(self.vocabulary, self.merges)
        self._ids: dict = {}

    @property
    def key(self):
        return (str(self.vocabulary), str(self.merges))

    def ids(self, texts):
        missing = [t for t in texts if t not in self._ids]
        if missing:
            for t, ids in zip(missing, self.reference.encode(missing)):
                self._ids[t] = ids
        return [self._ids[t] for t in texts]

    def special_ids(self):
        tok = self.reference.tokenizer
        return {tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>") if t in tok.vocabulary}

    def decode_id_lists(self, limit: int = 240) -> list[list[int]]:
        """Id lists for ``tokenizer.decode`` that no text encodes to (see the module docstring):
        the ids of texts cut where the bytes so far end inside a character (and the rest after
        that cut), ``<pad>`` and ``</s>`` put at the start, inside and at the end of a text's ids,
        and random ids of the vocabulary (not ``<s>`` or ``<unk>``)."""
        tok = self.reference.tokenizer
        out = []
        multibyte = [t for t in self.texts + byte_texts() if any(ord(c) > 0x7F for c in t)]
        for ids in self.ids(multibyte):
            data = b""
            for k in range(1, len(ids)):
                data += tok.id_bytes(ids[k - 1])
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError:             # the bytes so far end inside a character
                    out += [ids[:k], ids[k:]]
            if len(out) >= limit:
                break
        out = out[:limit]
        specials = sorted(tok.token_to_id(t) for t in ("<pad>", "</s>") if t in tok.vocabulary)
        unjudged = {tok.token_to_id(t) for t in ("<s>", "<unk>") if t in tok.vocabulary}
        for ids in self.ids(["Hello world", "naïve café — 東京 🚀", ""]):
            for s in specials:
                mid = len(ids) // 2
                out += [[s] + ids, ids[:mid] + [s] + ids[mid:], ids + [s], [s]]
        out.append(specials + specials[::-1])
        rng = np.random.default_rng(self.seed)
        known = sorted(set(tok.vocabulary.values()) - unjudged)
        for _ in range(48):
            out.append([known[int(j)] for j in rng.integers(0, len(known), int(rng.integers(1, 13)))])
        return [[int(i) for i in ids] for ids in out]


def find_tokenizer_files(path) -> tuple[Path, Path] | None:
    """``(vocab.json, merges.txt)`` of a transformers checkpoint or tokenizer directory, or a
    KerasHub preset (``assets/tokenizer/vocabulary.json``); None when there are none."""
    path = Path(path)
    for vocab, merges in (("vocab.json", "merges.txt"),
                          ("assets/tokenizer/vocabulary.json", "assets/tokenizer/merges.txt")):
        if (path / vocab).exists() and (path / merges).exists():
            return path / vocab, path / merges
    return None


# which tokenizer files each adapter holds (kept here: an adapter is the user's object)
_LOADED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _ensure_tokenizer(adapter, case: TokenizerCase):
    if _LOADED.get(adapter) != case.key:
        adapter.load_tokenizer(case.vocabulary, case.merges)
        _LOADED[adapter] = case.key


def _show(tokenizer, ids):
    return "[" + ", ".join(f"{i} {tokenizer.id_to_token(i)!r}" if 0 <= i < tokenizer.vocabulary_size()
                           else str(i) for i in ids) + "]"


def check_prompt_start(adapter, case: TokenizerCase) -> CheckResult:
    _ensure_tokenizer(adapter, case)
    texts = [t for t in case.texts if not t.startswith("</s>")]
    got = adapter.encode(texts)
    want = case.ids(texts)
    start = case.reference.tokenizer.start_token_id

    def leading(ids):
        n = 0
        while n < len(ids) and int(ids[n]) == start:
            n += 1
        return n

    for text, g, w in zip(texts, got, want):
        if leading(g) != leading(w):
            return CheckResult("tokenizer", "", FAIL, f"{len(texts)} texts",
                               f"text {text!r}: {leading(g)} leading </s> (id {start}), expected "
                               f"{leading(w)}: got {list(g)[:4]}..., expected {list(w)[:4]}...")
    return CheckResult("tokenizer", "", PASS, f"{len(texts)} texts, one leading </s> each")


def check_special_tokens(adapter, case: TokenizerCase) -> CheckResult:
    _ensure_tokenizer(adapter, case)
    got = adapter.encode(SPECIAL_TEXTS)
    want = case.ids(SPECIAL_TEXTS)
    special = case.special_ids()
    tok = case.reference.tokenizer
    for text, g, w in zip(SPECIAL_TEXTS, got, want):
        gs = [int(i) for i in g if int(i) in special]
        ws = [int(i) for i in w if int(i) in special]
        if gs != ws:
            return CheckResult("tokenizer", "", FAIL, f"{len(SPECIAL_TEXTS)} texts",
                               f"text {text!r}: special ids {gs}, expected {ws}; the port gave "
                               f"{_show(tok, g)}, expected {_show(tok, w)}")
    return CheckResult("tokenizer", "", PASS, f"{len(SPECIAL_TEXTS)} texts with <pad>, </s>")


def check_encode(adapter, case: TokenizerCase) -> CheckResult:
    _ensure_tokenizer(adapter, case)
    texts = case.texts + SPECIAL_TEXTS + whitespace_texts()
    got = adapter.encode(texts)
    want = case.ids(texts)
    tok = case.reference.tokenizer
    bad = 0
    first = None
    for text, g, w in zip(texts, got, want):
        g = [int(i) for i in g]
        if g != w:
            bad += 1
            if first is None:
                at = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
                first = (f"text {text!r}: first difference at id {at}: got {_show(tok, g[at:at + 4])}, "
                         f"expected {_show(tok, w[at:at + 4])} (lengths {len(g)} and {len(w)})")
    figures = f"{len(texts)} texts, {sum(len(w) for w in want)} ids, {bad} texts differ"
    return CheckResult("tokenizer", "", FAIL if bad else PASS, figures, first or "")


def byte_characters() -> list[str]:
    """One character for every byte value a UTF-8 text can hold, of every UTF-8 length: 00-7F
    (one byte), U+0080-U+00BF (C2 then every continuation byte 80-BF), a character for each lead
    byte C3-DF (two bytes), E0-EF (three) and F0-F4 (four).  C0, C1 and F5-FF never occur."""
    chars = [chr(b) for b in range(0x80)]
    chars += [chr(0x80 + k) for k in range(64)]
    chars += [chr(((lead & 0x1F) << 6) | 0x01) for lead in range(0xC3, 0xE0)]
    chars += [chr(0xD041 if lead == 0xED else ((lead & 0x0F) << 12) | 0x0A01) for lead in range(0xE0, 0xF0)]
    chars += [chr(0x100101 if lead == 0xF4 else ((lead & 0x07) << 18) | 0x10101) for lead in range(0xF0, 0xF5)]
    return chars


#: the contexts of ``tokenizer.bytes`` (``{}`` is the character): alone, after a space, at the
#: start of a word, inside a word
BYTE_CONTEXTS = ("{}", " {}", "a {}b", "a{}b")


def byte_texts() -> list[str]:
    return [context.format(c) for c in byte_characters() for context in BYTE_CONTEXTS]


def check_bytes(adapter, case: TokenizerCase) -> CheckResult:
    _ensure_tokenizer(adapter, case)
    texts = byte_texts()
    got = adapter.encode(texts)
    want = case.ids(texts)
    tok = case.reference.tokenizer
    bad = [(t, [int(i) for i in g], w) for t, g, w in zip(texts, got, want) if [int(i) for i in g] != w]
    chars = byte_characters()
    figures = f"{len(chars)} characters x {len(BYTE_CONTEXTS)} contexts, {len(bad)} texts differ"
    if not bad:
        return CheckResult("tokenizer", "", PASS, figures, "every byte value 00-F4 UTF-8 can hold, "
                           "UTF-8 lengths 1-4, alone / after a space / at a word start / inside a word")
    text, g, w = bad[0]
    c = next(ch for ch in chars if ch in text and text in [x.format(ch) for x in BYTE_CONTEXTS])
    context = BYTE_CONTEXTS[[x.format(c) for x in BYTE_CONTEXTS].index(text)]
    at = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
    return CheckResult("tokenizer", "", FAIL, figures,
                       f"character U+{ord(c):04X} (UTF-8 {c.encode('utf-8').hex(' ')}) in context "
                       f"{context!r}, text {text!r}: first difference at id {at}: got "
                       f"{_show(tok, g[at:at + 4])}, expected {_show(tok, w[at:at + 4])}",
                       {"codepoint": ord(c), "utf8": c.encode("utf-8").hex(), "context": context,
                        "texts_differing": len(bad)})


def check_decode(adapter, case: TokenizerCase) -> CheckResult:
    _ensure_tokenizer(adapter, case)
    texts = case.texts + SPECIAL_TEXTS + byte_texts()
    extra = case.decode_id_lists()
    ids = case.ids(texts) + extra
    got = adapter.decode(ids)
    want = case.reference.decode(ids)
    tok = case.reference.tokenizer
    labels = [f"text {t!r}" for t in texts] + [f"ids {_show(tok, i)}" for i in extra]
    bad = [(label, g, w) for label, g, w in zip(labels, got, want) if g != w]
    detail = f"{bad[0][0]}: decoded {bad[0][1]!r}, expected {bad[0][2]!r}" if bad else ""
    return CheckResult("tokenizer", "", FAIL if bad else PASS,
                       f"{len(texts)} texts and {len(extra)} id lists (cut inside characters, special "
                       f"tokens, random ids), {len(bad)} differ", detail)


def tokenizer_checks(adapter, case: TokenizerCase | None, reason: str = "") -> list[Check]:
    def skipped():
        raise NotSupported(reason or "no tokenizer files (vocab.json and merges.txt)")

    names = [("tokenizer.prompt_start", check_prompt_start), ("tokenizer.special_tokens", check_special_tokens),
             ("tokenizer.encode", check_encode), ("tokenizer.bytes", check_bytes),
             ("tokenizer.decode", check_decode)]
    if case is None:
        return [Check("tokenizer", n, skipped, needs=("tokenizer",)) for n, _ in names]
    return [Check("tokenizer", n, (lambda f=f: f(adapter, case)), needs=("tokenizer",)) for n, f in names]
