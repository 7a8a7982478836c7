"""``CTranslate2Adapter``: CTranslate2's ``Generator`` (a C++ inference engine) as a port.

CTranslate2 runs a model converted by its own converter from a transformers checkpoint.  The
adapter hands the converter what it needs and takes care of its quirks itself:

* the converter pads the vocabulary to a multiple of 8 (``madeupword0000``, ...) but not the
  embedding: the adapter pads the token table with zero rows first, cuts the logits back to the
  model's vocabulary, and keeps generation off the padding tokens;
* it loads a tokenizer from the checkpoint, which random models and bare checkpoints lack: the
  adapter gives it one naming each id (the oracle's tokenizer checks are not CTranslate2's business:
  it has no tokenizer of its own);
* it cannot convert a LayerNorm without affine parameters: the adapter writes gains of 1 and biases
  of 0, the same function.

CTranslate2 takes each row's tokens without padding, so both padding sides are handled by passing
the real tokens only (positions count from each row's first real token).  ``greedy`` runs CTranslate2's
own decoding loop (its KV cache) with no end token.  What it does not offer is not claimed: named
activations, gradients, a step-by-step cached decode fed given tokens, a sampler step on given
uniforms (it draws with its own generator), a tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from refopt.testing.adapter import Adapter, NotSupported


def _imports():
    import importlib.util

    # the converter reads checkpoints through transformers (and torch)
    missing = [m for m in ("ctranslate2", "torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise NotSupported(f"the ctranslate2 adapter needs ctranslate2, torch and transformers "
                           f"({missing[0]} is missing; pip install 'refopt[ctranslate2]')")
    import ctranslate2

    return ctranslate2


class _Names:
    """What the converter reads from a tokenizer: every id's token, and the special ones."""

    def __init__(self, vocabulary_size: int, bos: int, eos: int):
        self.vocab = {f"t{i}": i for i in range(vocabulary_size)}
        self.bos_token, self.eos_token = f"t{bos}", f"t{eos}"
        self.unk_token = f"t{min(3, vocabulary_size - 1)}"

    def get_vocab(self):
        return dict(self.vocab)


class CTranslate2Adapter(Adapter):
    """CTranslate2 on the CPU in ``compute_type`` (``"float32"``; ``"int8"`` and the like are
    quantised engines, judged with float32's tolerance they will fail)."""

    supports_left_padding = True
    capabilities = frozenset({"logits", "left_padding", "generation"})

    def __init__(self, compute_type: str = "float32"):
        self.ct2 = _imports()
        self.dtype = "float32"
        self.compute_type = compute_type
        self.name = f"ctranslate2 {self.ct2.__version__} ({compute_type})"
        self.generator = None
        self._dirs: list[str] = []

    # ------------------------------------------------------------------ loading
    def load(self, config, params):
        from safetensors.numpy import save_file

        from refopt.io import huggingface

        self._buildable(config)
        V = config.vocabulary_size
        padded = -(-V // 8) * 8
        cfg = dataclasses.replace(config, vocabulary_size=padded, layer_norm_elementwise_affine=True,
                                  dtype="float32")
        p = {k: np.asarray(v, np.float32) for k, v in params.items()}
        if padded != V:
            table = p["embed_tokens"]
            p["embed_tokens"] = np.concatenate([table, np.zeros((padded - V, table.shape[1]), np.float32)])
        if not config.layer_norm_elementwise_affine:       # the same function, with explicit gains
            from refopt.model import param_shapes

            for name, shape in param_shapes(cfg).items():
                if name.endswith(".gamma"):
                    p[name] = np.ones(shape, np.float32)
                elif name.endswith(".beta"):
                    p[name] = np.zeros(shape, np.float32)
        checkpoint = Path(self._tempdir())                 # a transformers checkpoint for the converter
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in huggingface.to_state_dict(p, cfg).items()},
                  str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
        (checkpoint / "config.json").write_text(json.dumps({**cfg.to_huggingface(), "dtype": "float32"}))
        self._convert(checkpoint, config, V)

    def load_preset(self, path):
        from refopt.testing.adapters import transformers_config

        config = transformers_config(path, "CTranslate2's converter")
        self._buildable(config)
        if config.vocabulary_size % 8 or not config.layer_norm_elementwise_affine:
            raise NotSupported("this checkpoint needs the adapter's conversion quirks (a vocabulary not a "
                               "multiple of 8, or LayerNorms without gains); the oracle passes refopt's "
                               "reading of it instead")
        self._convert(path, config, config.vocabulary_size)

    @staticmethod
    def _buildable(config):
        if config.do_layer_norm_before and config.remove_final_layer_norm:
            raise NotSupported("CTranslate2's decoder has a final LayerNorm whenever it normalises "
                               "before each block: a pre-LayerNorm model without one cannot be converted")

    def _convert(self, checkpoint, config, vocabulary_size: int):
        ct2 = self.ct2
        from transformers.utils import logging

        names = _Names(-(-vocabulary_size // 8) * 8, config.bos_token_id, config.eos_token_id)
        has_tokenizer = any((Path(checkpoint) / f).exists() for f in
                            ("tokenizer.json", "tokenizer_config.json", "vocab.json"))

        class Converter(ct2.converters.TransformersConverter):
            def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
                if not has_tokenizer:                   # the converter insists on one
                    return names
                return super().load_tokenizer(tokenizer_class, model_name_or_path, **kwargs)

        out = self._tempdir()
        bar = logging.is_progress_bar_enabled()
        logging.disable_progress_bar()
        try:
            Converter(str(checkpoint)).convert(out, force=True)
        finally:
            if bar:
                logging.enable_progress_bar()
        self.config = config
        self.vocabulary = vocabulary_size
        vocab_file = Path(out) / "vocabulary.json"
        tokens = json.loads(vocab_file.read_text()) if vocab_file.exists() else list(names.vocab)
        self._tokens = tokens
        self._padding_tokens = [[t] for t in tokens[vocabulary_size:]]
        self.generator = ct2.Generator(out, device="cpu", compute_type=self.compute_type)

    def _tempdir(self) -> str:
        d = tempfile.mkdtemp(prefix="refopt-ct2-")
        self._dirs.append(d)
        return d

    # ------------------------------------------------------------------ the model
    def logits(self, token_ids, padding_mask):
        ids = np.asarray(token_ids, np.int64)
        mask = np.asarray(padding_mask).astype(bool)
        rows = [[int(t) for t in row[m]] for row, m in zip(ids, mask)]
        out = np.asarray(self.generator.forward_batch(rows), np.float64)        # [B, max len, V']
        logits = np.zeros(ids.shape + (self.vocabulary,))
        for b, m in enumerate(mask):
            logits[b, m] = out[b, :int(m.sum()), :self.vocabulary]
        return logits

    def greedy(self, prompt_ids, max_new_tokens):
        tokens = [self._tokens[int(i)] for i in prompt_ids]
        result = self.generator.generate_batch(
            [tokens], max_length=max_new_tokens, include_prompt_in_result=False, end_token=[],
            sampling_topk=1, suppress_sequences=self._padding_tokens or None)
        return [int(i) for i in result[0].sequences_ids[0]]

    def close(self):
        self.generator = None
        for d in self._dirs:
            shutil.rmtree(d, ignore_errors=True)
        self._dirs.clear()
