"""``KerasHubAdapter``: KerasHub's ``OPTBackbone`` / ``OPTCausalLM`` as a port, in a worker process.

KerasHub runs on its TensorFlow backend in a subprocess (``python -m
refopt.testing.adapters._keras_worker``), so TensorFlow and PyTorch never share a process.  The
interpreter is ``REFOPT_KERAS_PYTHON`` when set (a separate environment with keras-hub and
tensorflow), else ``sys.executable`` when ``keras_hub`` is importable there (``pip install
'refopt[keras]'``); without either, every check is skipped with that reason.

What KerasHub is asked for:

* the model: refopt's parameters are written as a KerasHub preset (refopt's writer) and loaded with
  ``keras_hub.models.OPTBackbone.from_preset``; a KerasHub preset directory is loaded directly.
  KerasHub's OPTBackbone models pre-LayerNorm, biased, affine OPT without ``project_in``/``out``
  only (OPT-350m cannot be built): other configs are skipped.  Positions are absolute, so right
  padding only.
* named intermediates: the ``call`` of the embedding layer, each ``TransformerDecoder``'s query
  dense (its input), attention output dense, feed-forward dense layers and the decoder itself, and
  the final LayerNorm, observed in an eager call;
* gradients: ``tf.GradientTape`` over the backbone's trainable variables, mapped to refopt's names
  through the variables' paths and :func:`refopt.io.keras_h5.from_keras`;
* greedy decoding: ``OPTCausalLM(preprocessor=None).generate`` with ``stop_token_ids=None``;
* the tokenizer: ``OPTTokenizer`` with ``OPTCausalLMPreprocessor.generate_preprocess`` (which
  prepends ``</s>``) and ``generate_postprocess``;
* a sampler step: KerasHub's sampler class with ``keras.ops.top_k`` and
  ``keras.random.categorical`` observed, giving the distribution it would draw from; the common
  selection rule then picks with the oracle's uniforms.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from refopt.testing.adapter import Adapter, NotSupported

ENV_PYTHON = "REFOPT_KERAS_PYTHON"


class KerasHubAdapter(Adapter):
    """KerasHub (TensorFlow backend, float32) in a worker process; ``python`` overrides the
    interpreter (default: ``$REFOPT_KERAS_PYTHON`` or ``sys.executable``)."""

    dtype = "float32"
    supports_left_padding = False
    sampler_convention = "keras_hub"
    config_family = "keras_hub"
    # KerasHub right-pads (its positions start at each row's first column); its cached decoding is
    # exercised by ``generation`` (generate runs call_with_cache)
    capabilities = frozenset({"logits", "activations", "gradients", "generation", "tokenizer", "samplers"})

    def __init__(self, python: str | None = None, timeout: float = 600.0):
        python = python or os.environ.get(ENV_PYTHON)
        if python is None:
            if importlib.util.find_spec("keras_hub") is None:
                raise NotSupported("keras_hub is not installed in this interpreter (pip install "
                                   f"'refopt[keras]', or set {ENV_PYTHON} to a Python that has it)")
            python = sys.executable
        self.python = python
        self.timeout = timeout
        self.name = "keras-hub"
        self._proc = None
        self._dir = Path(tempfile.mkdtemp(prefix="refopt_keras_"))
        self._n = 0
        self.tokenizer_loaded = False

    # ------------------------------------------------------------------ the worker
    def _start(self):
        root = str(Path(__file__).resolve().parents[3])        # the directory holding `refopt`
        env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3",
               "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self._log = open(self._dir / "worker.log", "w")
        self._proc = subprocess.Popen([self.python, "-m", "refopt.testing.adapters._keras_worker"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                      text=True, env=env, cwd=str(self._dir))
        versions = self._call("ping")
        self.name = f"keras-hub {versions['keras_hub']} (keras {versions['keras']}, tensorflow)"

    def _call(self, op, args=None, arrays=None):
        if self._proc is None:
            self._start()
        self._n += 1
        path_in = None
        if arrays:
            path_in = str(self._dir / f"in{self._n}.npz")
            np.savez(path_in, **arrays)
        path_out = str(self._dir / f"out{self._n}.npz")
        request = {"op": op, "args": args or {}, "in": path_in, "out": path_out}
        try:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self._log.flush()
            tail = (self._dir / "worker.log").read_text(errors="replace").strip().splitlines()[-5:]
            self._proc = None
            raise RuntimeError(f"the KerasHub worker ({self.python}) exited: {' | '.join(tail)}")
        reply = json.loads(line)
        if not reply["ok"]:
            if reply.get("kind") == "NotSupported":
                raise NotSupported(reply["error"])
            raise RuntimeError(f"KerasHub: {reply['error']}")
        result = reply["result"]
        if isinstance(result, dict) and "arrays" in result:
            with np.load(path_out, allow_pickle=False) as data:
                out = {k: data[k] for k in data.files}
            os.remove(path_out)
            result = out
        if path_in:
            os.remove(path_in)
        return result

    def close(self):
        if self._proc is not None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=30)
            except Exception:
                self._proc.kill()
            self._proc = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ the model
    def load(self, config, params):
        from refopt.models import OPTBackbone

        if not config.keras_compatible:
            raise NotSupported("KerasHub's OPTBackbone models pre-LayerNorm OPT with biases, affine "
                               "LayerNorms, a final LayerNorm and no project_in/out only; this config "
                               "is outside it")
        cfg = dataclasses.replace(config, dtype=None)
        preset = self._dir / f"preset{self._n}"
        OPTBackbone.from_opt_config(cfg, {k: np.asarray(v, np.float32) for k, v in params.items()}) \
            .save_to_preset(preset, format="keras")
        self._call("load_preset", {"path": str(preset)})
        self.config = config

    def load_preset(self, path):
        from refopt.config import OPTConfig

        self._call("load_preset", {"path": str(path)})
        self.config = OPTConfig.from_file(Path(path) / "config.json")

    def _arrays(self, token_ids, padding_mask):
        return {"token_ids": np.asarray(token_ids, np.int64), "padding_mask": np.asarray(padding_mask, bool)}

    def logits(self, token_ids, padding_mask):
        return self._call("logits", arrays=self._arrays(token_ids, padding_mask))["logits"]

    def activations(self, token_ids, padding_mask, names):
        got = self._call("activations", arrays=self._arrays(token_ids, padding_mask))
        return {n: got[n] for n in names if n in got}

    def loss_and_gradients(self, token_ids, padding_mask):
        from refopt.io import keras_h5
        from refopt.model import param_shapes
        from refopt.testing.reference import loss_targets

        y, sw = loss_targets(token_ids, padding_mask, self.config.pad_token_id)
        got = self._call("loss_and_gradients", arrays={**self._arrays(token_ids, padding_mask),
                                                       "y": y, "sample_weight": sw})
        shapes = param_shapes(self.config)
        grads = {k[5:]: keras_h5.from_keras(k[5:], v, shapes[k[5:]]) for k, v in got.items()
                 if k.startswith("grad:")}
        return float(got["loss"]), grads

    def greedy(self, prompt_ids, max_new_tokens):
        got = self._call("greedy", arrays={"prompt": np.asarray(prompt_ids, np.int64),
                                           "max_new_tokens": np.asarray(max_new_tokens)})
        return [int(t) for t in got["ids"]]

    # ------------------------------------------------------------------ the tokenizer
    def load_tokenizer(self, vocabulary_path, merges_path):
        self._call("load_tokenizer", {"vocabulary": str(vocabulary_path), "merges": str(merges_path)})
        self.tokenizer_loaded = True

    def encode(self, texts):
        if not self.tokenizer_loaded:
            raise NotSupported("no tokenizer loaded")
        return self._call("encode", {"texts": list(texts)})["ids"]

    def decode(self, ids):
        if not self.tokenizer_loaded:
            raise NotSupported("no tokenizer loaded")
        return self._call("decode", {"ids": [[int(i) for i in row] for row in ids]})["texts"]

    # ------------------------------------------------------------------ the samplers
    def sample(self, spec, probabilities, uniforms):
        from refopt.philox import choose

        got = self._call("sampler_weights", {"spec": spec._asdict()},
                         arrays={"probabilities": np.asarray(probabilities, np.float64)})
        if "tokens" in got:
            return got["tokens"]
        return choose(got["weights"], uniforms)
