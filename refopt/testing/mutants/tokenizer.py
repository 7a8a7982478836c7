"""Mutants of the tokenizer."""

from __future__ import annotations

from refopt.testing.mutants.base import _Mutant


class TokenizerMergesByFrequency(_Mutant):
    bug = ("BPE merges applied in the order of the merged token's vocabulary id (fairseq's "
           "frequency order in OPT's vocabulary) instead of merges.txt's rank")

    def load_tokenizer(self, vocabulary_path, merges_path):
        from refopt.models import OPTTokenizer

        tok = OPTTokenizer(vocabulary=str(vocabulary_path), merges=str(merges_path), compiled=False)
        tables = tok._tables
        tables._pair_dict = {pair: (new, new) for pair, (rank, new) in tables.pair_dict.items()}
        self.tokenizer = tok


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

    def load_tokenizer(self, vocabulary_path, merges_path):
        from refopt.models import OPTTokenizer

        tok = OPTTokenizer(vocabulary=str(vocabulary_path), merges=str(merges_path), compiled=False)
        byte_ids = tok._tables.byte_ids.tolist()
        byte_ids[0x7F] = tok.token_to_id("<unk>")
        tok._py_byte_ids = byte_ids
        self.tokenizer = tok
