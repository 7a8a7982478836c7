"""Compiled byte-level BPE encoding (Numba): GPT-2's split and the merge loop in one pass.

The readable reference is :func:`refopt.tokenizers.byte_level.pretokenize` followed by
:func:`refopt.tokenizers.bpe.bpe_merge`; these kernels must give the same ids, and the tests check
that on random Unicode and on a whole corpus.  The text arrives as UTF-8 bytes and:

1. a scanner walks the code points, classified (letter / number / whitespace / other) through
   the two-level table of :func:`refopt.tokenizers.byte_level.char_class_table`, and cuts words
   exactly where GPT-2's pattern does (contractions, one optional leading space, runs of one
   class, a whitespace run leaving its last character to the next word when text follows);
2. each word's bytes are looked up in a cache of merged words; a miss runs the merge loop:
   lowest rank first, leftmost on ties.  Words longer than ``long_word`` bytes use a binary heap
   over a linked list (O(n log n)) instead of rescanning (O(n^2)), with the same result.

Calling a compiled function costs about 0.1 us per array argument, which matters for short texts,
so everything read-only lives in one int64 array ``tables`` and everything mutable in one int64
array ``state`` (layouts below, built by :func:`pack_tables` and :func:`new_state`).

``tables``::

    [0:8]              header: where each part starts, the merge-table mask, long_word
    byte_ids           256 ids, the one-byte token of each byte
    char index         4352 block numbers (code point >> 8)
    char blocks        256 classes per block
    pair keys          open-addressing table: (a << 32) | b, or -1 for an empty slot
    pair values        rank << 32 | id of "ab"

``state``::

    [0:8]              header: words cached, overflow ids used, slot count, overflow size,
                       where the slots and the overflow start
    scratch            2 x SCRATCH int64 for the merge loop of one word (symbols, pair entries)
    slots              4 int64 per cached word: its bytes (up to 16, little-endian, zero padded)
                       in two words, n | m << 8 | first id << 16 (0: empty slot), then the
                       second id or, for words of more than two ids, where they start in overflow
    overflow           ids of cached words that merge to more than two tokens

The cache is emptied when half its slots or its overflow are used, then refills with the words
seen next.
"""

from __future__ import annotations

import numpy as np
from numba import njit

OTHER, LETTER, NUMBER, SPACE = 0, 1, 2, 3
NO_RANK = 2**31 - 1
SCRATCH = 256  # words up to this many bytes use the rescanning merge loop and the scratch space
CACHE_MAX_WORD = 16  # longer words are merged every time (rare, and rarely repeated)
_GOLDEN = np.int64(-7046029254386353131)  # 0x9E3779B97F4A7C15 as int64
_PRIME = np.int64(1099511628211)

# tables header
T_BYTE_IDS, T_INDEX, T_BLOCKS, T_KEYS, T_VALUES, T_MASK, T_LONG_WORD = 0, 1, 2, 3, 4, 5, 6
# state header
S_WORDS, S_OVERFLOW_USED, S_SLOTS, S_OVERFLOW_SIZE, S_SLOTS_AT, S_OVERFLOW_AT = 0, 1, 2, 3, 4, 5
HEADER = 8


def pack_tables(byte_ids, index, blocks, pair_keys, pair_ranks, pair_new, long_word=SCRATCH):
    """One int64 array holding the byte ids, the character classes and the merge hash table."""
    cap = 16
    while cap < 2 * len(pair_keys):
        cap *= 2
    parts = [np.asarray(byte_ids, np.int64), np.asarray(index, np.int64),
             np.asarray(blocks, np.int64).ravel()]
    starts, at = [], HEADER
    for part in parts:
        starts.append(at)
        at += len(part)
    tables = np.empty(at + 2 * cap, dtype=np.int64)
    tables[:HEADER] = 0
    for start, part in zip(starts, parts):
        tables[start:start + len(part)] = part
    tables[T_BYTE_IDS], tables[T_INDEX], tables[T_BLOCKS] = starts
    tables[T_KEYS], tables[T_VALUES] = at, at + cap
    tables[T_MASK] = cap - 1
    tables[T_LONG_WORD] = min(long_word, SCRATCH)
    values = (np.asarray(pair_ranks, np.int64) << 32) | np.asarray(pair_new, np.int64)
    _fill_pair_table(tables, np.asarray(pair_keys, np.int64), values)
    return tables


def new_state(slots=1 << 16, overflow=1 << 16):
    """Scratch space and an empty word cache (``slots`` a power of two); 2.6 MB by default."""
    state = np.zeros(HEADER + 2 * SCRATCH + 4 * slots + overflow, dtype=np.int64)
    state[S_SLOTS], state[S_OVERFLOW_SIZE] = slots, overflow
    state[S_SLOTS_AT] = HEADER + 2 * SCRATCH
    state[S_OVERFLOW_AT] = HEADER + 2 * SCRATCH + 4 * slots
    return state


# ---------------------------------------------------------------------------------------------
# Merge table: (a, b) -> rank, id of "ab"
# ---------------------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _mix(key):
    h = key * _GOLDEN
    return h ^ (h >> 29)


@njit(cache=True)
def _fill_pair_table(tables, keys, values):
    kat, vat, mask = tables[T_KEYS], tables[T_VALUES], tables[T_MASK]
    tables[kat:kat + mask + 1] = -1
    for i in range(len(keys)):
        s = _mix(keys[i]) & mask
        while tables[kat + s] != -1 and tables[kat + s] != keys[i]:
            s = (s + 1) & mask
        tables[kat + s] = keys[i]
        tables[vat + s] = values[i]


@njit(cache=True, inline="always")
def _pair_value(tables, a, b):
    """rank << 32 | id of "ab" for the pair (a, b), or -1 if no merge joins them."""
    key = (a << 32) | b
    kat, mask = tables[T_KEYS], tables[T_MASK]
    s = _mix(key) & mask
    while True:
        k = tables[kat + s]
        if k == key:
            return tables[tables[T_VALUES] + s]
        if k == -1:
            return np.int64(-1)
        s = (s + 1) & mask


# ---------------------------------------------------------------------------------------------
# The merge loop
# ---------------------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _rank_of(value):
    return value >> 32 if value >= 0 else np.int64(NO_RANK)


@njit(cache=True)
def merge_short(tables, sym, n, value):
    """Merge sym[:n] in place, rescanning for the lowest rank each step; returns the new length.

    ``value[k]`` holds the merge-table entry of the pair (sym[k], sym[k + 1]).
    """
    for k in range(n - 1):
        value[k] = _pair_value(tables, sym[k], sym[k + 1])
    while n > 1:
        best = np.int64(NO_RANK)
        at = -1
        for k in range(n - 1):
            r = _rank_of(value[k])
            if r < best:
                best = r
                at = k
        if at < 0:
            break
        sym[at] = value[at] & 0xFFFFFFFF
        for k in range(at + 1, n - 1):
            sym[k] = sym[k + 1]
        for k in range(at + 1, n - 2):
            value[k] = value[k + 1]
        n -= 1
        if at > 0:
            value[at - 1] = _pair_value(tables, sym[at - 1], sym[at])
        if at < n - 1:
            value[at] = _pair_value(tables, sym[at], sym[at + 1])
    return n


@njit(cache=True, inline="always")
def _heap_push(heap, size, item):
    i = size
    heap[i] = item
    while i > 0:
        p = (i - 1) >> 1
        if heap[p] <= heap[i]:
            break
        heap[p], heap[i] = heap[i], heap[p]
        i = p
    return size + 1


@njit(cache=True, inline="always")
def _heap_pop(heap, size):
    top = heap[0]
    size -= 1
    heap[0] = heap[size]
    i = 0
    while True:
        c = 2 * i + 1
        if c >= size:
            break
        if c + 1 < size and heap[c + 1] < heap[c]:
            c += 1
        if heap[i] <= heap[c]:
            break
        heap[i], heap[c] = heap[c], heap[i]
        i = c
    return top, size


@njit(cache=True)
def merge_long(tables, sym, n):
    """Merge sym[:n] with a heap of (rank, position) over a linked list; returns the new length.

    Heap items are ``rank << 32 | position``: the smallest is the lowest rank, leftmost on ties
    (positions keep their left-to-right order), as in :func:`merge_short`.  Items whose pair has
    changed since they were pushed are skipped when popped.
    """
    nxt = np.empty(n, dtype=np.int64)
    prv = np.empty(n, dtype=np.int64)
    alive = np.ones(n, dtype=np.bool_)
    heap = np.empty(3 * n + 1, dtype=np.int64)
    size = 0
    for k in range(n):
        nxt[k] = k + 1 if k + 1 < n else -1
        prv[k] = k - 1
    for k in range(n - 1):
        v = _pair_value(tables, sym[k], sym[k + 1])
        if v >= 0:
            size = _heap_push(heap, size, ((v >> 32) << 32) | k)
    while size > 0:
        item, size = _heap_pop(heap, size)
        k = item & 0xFFFFFFFF
        if not alive[k] or nxt[k] < 0:
            continue
        j = nxt[k]
        v = _pair_value(tables, sym[k], sym[j])
        if v < 0 or (v >> 32) != (item >> 32):
            continue  # stale: the pair at k changed since this item was pushed
        sym[k] = v & 0xFFFFFFFF
        alive[j] = False
        nxt[k] = nxt[j]
        if nxt[j] >= 0:
            prv[nxt[j]] = k
        p = prv[k]
        if p >= 0:
            v = _pair_value(tables, sym[p], sym[k])
            if v >= 0:
                size = _heap_push(heap, size, ((v >> 32) << 32) | p)
        if nxt[k] >= 0:
            v = _pair_value(tables, sym[k], sym[nxt[k]])
            if v >= 0:
                size = _heap_push(heap, size, ((v >> 32) << 32) | k)
    m = 0
    k = 0
    while k >= 0:
        sym[m] = sym[k]
        m += 1
        k = nxt[k]
    return m


@njit(cache=True)
def merge_word(tables, state, ids):
    """Merge a word given as one-byte token ids (any length); returns the merged ids.

    Exposed for tests of the two merge loops; encoding calls them directly.
    """
    n = len(ids)
    sym = np.empty(max(n, 1), dtype=np.int64)
    sym[:n] = ids
    if n <= tables[T_LONG_WORD]:
        m = merge_short(tables, sym, n, np.empty(max(n, 1), dtype=np.int64))
    else:
        m = merge_long(tables, sym, n)
    return sym[:m].copy()


# ---------------------------------------------------------------------------------------------
# Words -> ids, through the cache
# ---------------------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _word_slot(k0, k1, n, mask):
    h = (k0 * _GOLDEN) ^ ((k1 + n) * _PRIME)
    h ^= h >> 31
    h *= _GOLDEN
    return (h ^ (h >> 29)) & mask


@njit(cache=True, inline="always")
def _emit_word(data, start, end, tables, state, out, o):
    """Encode the word data[start:end] into out[o:]; returns the new write position."""
    n = end - start
    byte_ids = tables[T_BYTE_IDS]
    if n == 1:
        out[o] = tables[byte_ids + data[start]]
        return o + 1
    slots = state[S_SLOTS_AT]
    mask = state[S_SLOTS] - 1
    k0 = np.int64(0)
    k1 = np.int64(0)
    s = np.int64(0)
    cacheable = n <= CACHE_MAX_WORD
    if cacheable:
        for p in range(min(n, 8)):
            k0 |= np.int64(data[start + p]) << (8 * p)
        for p in range(8, n):
            k1 |= np.int64(data[start + p]) << (8 * (p - 8))
        s = _word_slot(k0, k1, n, mask)
        while True:
            at = slots + 4 * s
            head = state[at + 2]
            if head == 0:
                break
            if state[at] == k0 and state[at + 1] == k1 and (head & 0xFF) == n:
                m = (head >> 8) & 0xFF
                out[o] = head >> 16
                if m == 2:
                    out[o + 1] = state[at + 3]
                elif m > 2:
                    v = state[S_OVERFLOW_AT] + state[at + 3]
                    for q in range(m):
                        out[o + q] = state[v + q]
                return o + m
            s = (s + 1) & mask
    # A miss: merge.
    if n <= tables[T_LONG_WORD]:
        sym = state[HEADER:HEADER + SCRATCH]
        for p in range(n):
            sym[p] = tables[byte_ids + data[start + p]]
        m = merge_short(tables, sym, n, state[HEADER + SCRATCH:HEADER + 2 * SCRATCH])
    else:
        sym = np.empty(n, dtype=np.int64)
        for p in range(n):
            sym[p] = tables[byte_ids + data[start + p]]
        m = merge_long(tables, sym, n)
    for q in range(m):
        out[o + q] = sym[q]
    if cacheable:
        if 2 * (state[S_WORDS] + 1) > state[S_SLOTS] or \
                (m > 2 and state[S_OVERFLOW_USED] + m > state[S_OVERFLOW_SIZE]):
            for t in range(state[S_SLOTS]):  # full: start afresh
                state[slots + 4 * t + 2] = 0
            state[S_WORDS] = 0
            state[S_OVERFLOW_USED] = 0
            s = _word_slot(k0, k1, n, mask)
        at = slots + 4 * s
        state[at] = k0
        state[at + 1] = k1
        state[at + 2] = n | (m << 8) | (sym[0] << 16)
        if m == 2:
            state[at + 3] = sym[1]
        elif m > 2:
            state[at + 3] = state[S_OVERFLOW_USED]
            v = state[S_OVERFLOW_AT] + state[S_OVERFLOW_USED]
            for q in range(m):
                state[v + q] = sym[q]
            state[S_OVERFLOW_USED] += m
        state[S_WORDS] += 1
    return o + m


# ---------------------------------------------------------------------------------------------
# The scanner: GPT-2's split
# ---------------------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _class_at(data, p, tables):
    """(class, byte width) of the code point starting at data[p] (valid UTF-8)."""
    b = np.int64(data[p])
    if b < 0x80:
        cp = b
        w = 1
    elif b < 0xE0:
        cp = ((b & 0x1F) << 6) | (np.int64(data[p + 1]) & 0x3F)
        w = 2
    elif b < 0xF0:
        cp = (((b & 0x0F) << 12) | ((np.int64(data[p + 1]) & 0x3F) << 6)
              | (np.int64(data[p + 2]) & 0x3F))
        w = 3
    else:
        cp = (((b & 0x07) << 18) | ((np.int64(data[p + 1]) & 0x3F) << 12)
              | ((np.int64(data[p + 2]) & 0x3F) << 6) | (np.int64(data[p + 3]) & 0x3F))
        w = 4
    block = tables[tables[T_INDEX] + (cp >> 8)]
    return tables[tables[T_BLOCKS] + block * 256 + (cp & 255)], w


@njit(cache=True, inline="always")
def _run_end(data, q, stop, cls, tables):
    """End of the run of characters of class ``cls`` that continues at data[q]."""
    while q < stop:
        c, w = _class_at(data, q, tables)
        if c != cls:
            break
        q += w
    return q


@njit(cache=True, inline="always")
def _word_end(data, p, stop, tables):
    """End of the word that starts at data[p], as GPT-2's pattern cuts it."""
    b0 = data[p]
    if b0 == 39 and p + 1 < stop:  # "'": 's 't 'm 'd 're 've 'll (lower case only)
        b1 = data[p + 1]
        if b1 == 115 or b1 == 116 or b1 == 109 or b1 == 100:
            return p + 2
        if p + 2 < stop:
            b2 = data[p + 2]
            if (b2 == 101 and (b1 == 114 or b1 == 118)) or (b1 == 108 and b2 == 108):
                return p + 3
    if b0 == 32 and p + 1 < stop:  # " ?" then a run of one class
        c1, w = _class_at(data, p + 1, tables)
        if c1 != SPACE:
            return _run_end(data, p + 1 + w, stop, c1, tables)
    c0, w = _class_at(data, p, tables)
    q = p + w
    if c0 != SPACE:  # a run of letters, numbers or others
        return _run_end(data, q, stop, c0, tables)
    last = p  # whitespace: the run, less its last character when text follows
    while q < stop:
        c, w = _class_at(data, q, tables)
        if c != SPACE:
            break
        last = q
        q += w
    if q < stop and last > p:
        return last
    return q


@njit(cache=True)
def _encode_range(data, start, stop, tables, state, out, o):
    """Split data[start:stop] as GPT-2's pattern does and encode each word; returns new o."""
    p = start
    while p < stop:
        q = _word_end(data, p, stop, tables)
        o = _emit_word(data, p, q, tables, state, out, o)
        p = q
    return o


@njit(cache=True)
def split_words(data, tables):
    """Byte offsets where the words of the UTF-8 text start (and its length, last): the scanner
    alone, for tests against the regex."""
    bounds = np.empty(len(data) + 1, dtype=np.int64)
    n = 0
    p = 0
    while p < len(data):
        bounds[n] = p
        n += 1
        p = _word_end(data, p, len(data), tables)
    bounds[n] = len(data)
    return bounds[:n + 1].copy()


@njit(cache=True)
def encode_one(data, tables, state, out):
    """Encode one UTF-8 text into out (len(out) >= len(data)); returns the number of ids."""
    zero = np.int64(0)
    return _encode_range(data, zero, np.int64(len(data)), tables, state, out, zero)


@njit(cache=True)
def encode_many(data, bounds, tables, state, out, ends):
    """Encode each UTF-8 segment data[bounds[i]:bounds[i+1]] independently into out.

    ``ends[i]`` receives the end of segment i's ids in ``out``; returns the number of ids.
    """
    o = np.int64(0)
    for g in range(len(bounds) - 1):
        o = _encode_range(data, bounds[g], bounds[g + 1], tables, state, out, o)
        ends[g] = o
    return o


def encode_batch(encoded: list, tables, state) -> list:
    """Token ids of each UTF-8 text in ``encoded`` (a list of lists): one text through
    :func:`encode_one`, several joined into one buffer through :func:`encode_many`."""
    if len(encoded) == 1:
        data = encoded[0]
        out = np.empty(len(data) + 1, dtype=np.int32)
        n = encode_one(data, tables, state, out)
        return [out[:n].tolist()]
    if not encoded:
        return []
    data = b"".join(encoded)
    bounds = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=bounds[1:])
    out = np.empty(len(data), dtype=np.int32)
    ends = np.empty(len(encoded), dtype=np.int64)
    encode_many(data, bounds, tables, state, out, ends)
    flat = out[:ends[-1]].tolist()
    starts = [0] + ends[:-1].tolist()
    return [flat[s:e] for s, e in zip(starts, ends.tolist())]
