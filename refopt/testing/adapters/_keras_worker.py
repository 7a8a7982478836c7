"""The KerasHub side of :class:`refopt.testing.adapters.keras_hub.KerasHubAdapter`: a worker process
running KerasHub on its TensorFlow backend (so TensorFlow never shares a process with PyTorch).

Protocol: one JSON request per line on stdin, ``{"op": ..., "args": {...}, "in": npz path or null,
"out": npz path}``; one JSON reply per line on stdout, ``{"ok": true, "result": ...}`` (arrays in
the ``out`` npz) or ``{"ok": false, "error": "...", "kind": "NotSupported" | "Error"}``.  Everything
else (TensorFlow's logging) goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402


class NotSupported(Exception):
    pass


class Worker:
    def __init__(self):
        import keras
        import keras_hub

        self.keras, self.keras_hub = keras, keras_hub
        self.backbone = None
        self.tokenizer = None
        self.preprocessor = None

    # ------------------------------------------------------------------ the model
    def load_preset(self, path):
        if not os.path.exists(os.path.join(path, "model.weights.h5")):
            raise NotSupported(f"{path} is not a KerasHub preset (no model.weights.h5); KerasHub reads "
                               "only its own layout")
        self.backbone = self.keras_hub.models.OPTBackbone.from_preset(path)
        return {"config": self.backbone.get_config()}

    def _inputs(self, a):
        return {"token_ids": np.asarray(a["token_ids"], np.int32),
                "padding_mask": np.asarray(a["padding_mask"], np.int32)}

    def _watch(self):
        """Wrap the ``call`` of the modules whose inputs/outputs are named intermediates."""
        got, undo = {}, []
        bb = self.backbone

        def wrap(obj, name, which):
            original = obj.call

            def call(*args, **kwargs):
                out = original(*args, **kwargs)
                value = args[0] if which == "input" else (out[0] if isinstance(out, (tuple, list)) else out)
                got[name] = np.asarray(value, np.float64)
                return out

            obj.call = call
            undo.append(lambda: setattr(obj, "call", original))

        wrap(bb.embeddings, "embeddings", "output")
        for i, layer in enumerate(bb.transformer_layers):
            p = f"layers.{i}."
            attn = layer._self_attention_layer
            wrap(attn._query_dense, p + "attention_input", "input")
            wrap(attn._output_dense, p + "attention_output", "output")
            wrap(layer._feedforward_intermediate_dense, p + "mlp_input", "input")
            wrap(layer._feedforward_output_dense, p + "mlp_output", "output")
            wrap(layer, p + "output", "output")
        wrap(bb.layer_norm, "final_norm", "output")
        return got, undo

    def logits(self, a, watch=False):
        got, undo = self._watch() if watch else ({}, [])
        try:
            x = self.backbone(self._inputs(a), training=False)
            logits = self.backbone.token_embedding(x, reverse=True)
        finally:
            for u in undo:
                u()
        got["logits"] = np.asarray(logits, np.float64)
        return got

    def activations(self, a):
        B, S = np.asarray(a["token_ids"]).shape
        got = self.logits(a, watch=True)
        return {k: v.reshape(B, S, -1) for k, v in got.items()}

    def loss_and_gradients(self, a):
        import tensorflow as tf

        from refopt.io import keras_h5

        names = {}
        for ours, (dense, var) in keras_h5.DENSE.items():
            names[f"self_attention/{var}/kernel"] = ours + ".weight"
            names[f"self_attention/{var}/bias"] = ours + ".bias"
        for ours, (_, var) in list(keras_h5.NORMS.items()):
            names[f"{var}/gamma"] = ours + ".gamma"
            names[f"{var}/beta"] = ours + ".beta"
        for ours, (_, var) in keras_h5.MLP.items():
            names[f"{var}/kernel"] = ours + ".weight"
            names[f"{var}/bias"] = ours + ".bias"
        variables, ours = [], []
        for v in self.backbone.trainable_weights:
            path = v.path
            if path == "embeddings/token_embedding/embeddings":
                name = "embed_tokens"
            elif path == "embeddings/position_embedding/embeddings":
                name = "embed_positions"
            elif path.startswith("layer_norm/"):
                name = "final_layer_norm." + path.split("/")[-1]
            elif path.startswith("transformer_layer_"):
                head, rest = path.split("/", 1)
                name = f"layers.{int(head.rsplit('_', 1)[1])}." + names[rest]
            else:
                raise NotSupported(f"unknown KerasHub variable {path}")
            variables.append(v)
            ours.append(name)
        inputs = self._inputs(a)
        y = tf.constant(np.asarray(a["y"], np.int32))
        w = tf.constant(np.asarray(a["sample_weight"], np.float32))
        with tf.GradientTape() as tape:
            x = self.backbone(inputs, training=False)
            logits = self.backbone.token_embedding(x, reverse=True)
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
            loss = tf.reduce_sum(w * ce) / tf.reduce_sum(w)
        grads = tape.gradient(loss, [v.value if hasattr(v, "value") else v for v in variables])
        out = {"loss": np.asarray(float(loss))}
        for name, g in zip(ours, grads):
            out["grad:" + name] = np.asarray(tf.convert_to_tensor(g), np.float64)
        return out

    def greedy(self, a):
        lm = self.keras_hub.models.OPTCausalLM(backbone=self.backbone, preprocessor=None)
        lm.compile(sampler="greedy")
        prompt = list(a["prompt"])
        n, total = len(prompt), len(prompt) + int(a["max_new_tokens"])
        ids = np.full((1, total), 1, np.int32)
        ids[0, :n] = prompt
        mask = np.zeros((1, total), np.int32)
        mask[0, :n] = 1
        out = lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)
        return {"ids": np.asarray(out["token_ids"])[0, n:]}

    # ------------------------------------------------------------------ the tokenizer
    def load_tokenizer(self, a):
        self.tokenizer = self.keras_hub.models.OPTTokenizer(vocabulary=a["vocabulary"], merges=a["merges"])
        self.preprocessor = self.keras_hub.models.OPTCausalLMPreprocessor(self.tokenizer)
        return {}

    def encode(self, a):
        texts = list(a["texts"])
        length = 4 * max([len(t.encode("utf-8")) for t in texts] + [1]) + 8
        x = self.preprocessor.generate_preprocess(texts, sequence_length=length)
        ids, mask = np.asarray(x["token_ids"]), np.asarray(x["padding_mask"]).astype(bool)
        return {"ids": [[int(i) for i in row[m]] for row, m in zip(ids, mask)]}

    def decode(self, a):
        rows = [list(r) for r in a["ids"]]
        length = max([len(r) for r in rows] + [1])
        ids = np.full((len(rows), length), self.tokenizer.pad_token_id, np.int32)
        mask = np.zeros((len(rows), length), bool)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
            mask[i, :len(r)] = True
        texts = self.preprocessor.generate_postprocess({"token_ids": ids, "padding_mask": mask})
        return {"texts": [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]}

    # ------------------------------------------------------------------ the samplers
    def sampler_weights(self, a):
        """KerasHub's filtered distribution in token-id order: its sampler runs with keras.ops.top_k
        and keras.random.categorical observed (categorical's input is the log of the kept weights,
        in the order top_k produced)."""
        import keras
        import keras_hub.src.samplers.random_sampler as rs
        import keras_hub.src.samplers.top_k_sampler as tks
        import keras_hub.src.samplers.top_p_sampler as tps

        seen = {}

        class Ops:
            def __getattr__(self, name):
                return getattr(keras.ops, name)

            def top_k(self, x, k, sorted=True):
                values, indices = keras.ops.top_k(x, k, sorted=sorted)
                seen["indices"] = np.asarray(indices)
                return values, indices

        class Random:
            def __getattr__(self, name):
                return getattr(keras.random, name)

            def categorical(self, logits, num_samples, seed=None, dtype="int32"):
                seen["logits"] = np.asarray(logits, np.float64)
                return keras.ops.zeros((logits.shape[0], num_samples), dtype=dtype)

        spec = a["spec"]
        cls = {"greedy": self.keras_hub.samplers.GreedySampler, "random": rs.RandomSampler,
               "top_k": tks.TopKSampler, "top_p": tps.TopPSampler}[spec["name"]]
        kwargs = {"temperature": spec["temperature"]}
        if spec["name"] == "top_k":
            kwargs["k"] = spec["k"]
        if spec["name"] == "top_p":
            kwargs.update(p=spec["p"], k=spec["k"])
        sampler = cls(**kwargs)
        p = np.asarray(a["probabilities"], np.float32)
        with np.errstate(divide="ignore"):
            logits = np.log(p)
        probs = sampler.compute_probabilities(keras.ops.convert_to_tensor(logits))
        if spec["name"] == "greedy":
            return {"tokens": np.asarray(sampler.get_next_token(probs))}
        saved = [(m, m.ops, m.random) for m in (rs, tks, tps)]
        try:
            for m in (rs, tks, tps):
                m.ops, m.random = Ops(), Random()
            sampler.get_next_token(probs)
        finally:
            for m, o, r in saved:
                m.ops, m.random = o, r
        kept = np.exp(seen["logits"])                                         # [B, n]
        B, V = p.shape
        index = seen.get("indices", np.broadcast_to(np.arange(V), (B, V)))
        weights = np.zeros((B, V))
        np.put_along_axis(weights, np.asarray(index)[:, :kept.shape[1]], kept, axis=-1)
        return {"weights": weights}


def main():
    worker = None
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            if worker is None:
                worker = Worker()
            args = dict(req.get("args") or {})
            if req.get("in"):
                with np.load(req["in"], allow_pickle=False) as data:
                    args.update({k: data[k] for k in data.files})
            op = req["op"]
            if op == "ping":
                result = {"keras_hub": worker.keras_hub.__version__, "keras": worker.keras.__version__}
            elif op == "load_preset":
                result = worker.load_preset(args["path"])
            elif op == "load_tokenizer":
                result = worker.load_tokenizer(args)
            elif op in ("encode", "decode"):
                result = getattr(worker, op)(args)
            else:
                arrays = getattr(worker, op)(args)
                np.savez(req["out"], **arrays)
                result = {"arrays": sorted(arrays)}
            reply = {"ok": True, "result": result}
        except NotSupported as e:
            reply = {"ok": False, "kind": "NotSupported", "error": str(e)}
        except Exception as e:  # reported to the parent, which names it in the failing check
            traceback.print_exc(file=sys.stderr)
            reply = {"ok": False, "kind": "Error", "error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
