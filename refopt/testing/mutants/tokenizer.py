"""Mutants of the tokenizer."""

from __future__ import annotations

from refopt.testing.mutants.base import _Mutant


class TokenizerMergesByFrequency(_Mutant):
    bug = ("BPE merges applied in the order of the merged token's vocabulary id (fairseq's "
           "frequency order in OPT's vocabulary) instead of merges.txt's rank")

    def load_tokenizer(self, vocabulary_path, merges_path):
        from refopt.models import OPTTokenizer

        tok = OPTTokenizer(vocabulary=str(vocabulary_path), merges=str(merges_path))
        # the same merge rules, ranked by the id of the token each one makes
        by_id = sorted(tok.merges, key=lambda rule: tok.vocabulary["".join(rule.split(" "))])
        self.tokenizer = OPTTokenizer(vocabulary=tok.vocabulary, merges=by_id)


class LeadingEosDropped(_Mutant):
    bug = "prompts without the leading </s> (the published OPT tokenizer prepends it)"

    def encode(self, texts):
        return [ids[1:] for ids in super().encode(texts)]


class LeadingEosDoubled(_Mutant):
    bug = "a leading </s> added twice (once by the tokenizer, once by the preprocessor)"

    def encode(self, texts):
        return [ids[:1] + ids for ids in super().encode(texts)]


class PadSplit(_Mutant):
    bug = "<pad> written in the text split into '<', 'pad', '>' (special tokens not matched in text)"

    def load_tokenizer(self, vocabulary_path, merges_path):
        from refopt.models import OPTTokenizer

        self.tokenizer = OPTTokenizer(vocabulary=str(vocabulary_path), merges=str(merges_path),
                                      special_tokens_in_strings=False)


class TokenizerDelByte(_Mutant):
    bug = ("a byte-to-symbol table whose printable range runs to 0x7F: DEL keeps itself as its "
           "symbol (GPT-2 maps it to 'ġ'), which the vocabulary lacks, so it becomes <unk>")

    def encode(self, texts):
        # what such a port produces: every token that holds DEL's symbol comes out as <unk>
        tok = self._tok()
        unk = tok.token_to_id("<unk>")
        return [[unk if "ġ" in tok.id_to_token(i) else i for i in ids] for ids in super().encode(texts)]


class DecodeDropsInvalidBytes(_Mutant):
    bug = ("decoding drops bytes that are not UTF-8 (``errors='ignore'``) instead of writing U+FFFD: "
           "ids cut inside a character -- generation stopped mid-character -- lose it silently")

    def decode(self, ids):
        tok, special = self._tok(), self._left_out()
        return [b"".join(tok.id_bytes(int(i)) for i in row if int(i) not in special).decode("utf-8", "ignore")
                for row in ids]


class TokenizerInPieces(_Mutant):
    bug = ("text encoded in pieces of at least 8 characters cut between pre-tokens, each piece split "
           "alone: a whitespace run that ends a piece no longer sees the character after it, which "
           "GPT-2's split regex looks at (``\\s+(?!\\S)``)")

    PIECE = 8

    def encode(self, texts):
        import regex

        from refopt.tokenizers import pretokenize

        tok = self._tok()
        specials = regex.compile("(<pad>|</s>)")
        out = []
        for text in texts:
            ids = [tok.start_token_id]
            for part in specials.split(text):
                if part in ("<pad>", "</s>"):
                    ids.append(tok.token_to_id(part))
                    continue
                piece = ""
                for pre in pretokenize(part) + [None]:
                    if pre is None or len(piece) >= self.PIECE:
                        if piece:
                            ids += [int(i) for i in tok([piece])[0]]
                        piece = ""
                    if pre is not None:
                        piece += pre
            out.append(ids)
        return out
