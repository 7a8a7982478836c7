"""``TransformersAdapter``: Hugging Face transformers' ``OPTForCausalLM`` (PyTorch) as a port.

Named intermediates come from forward hooks on transformers' own modules (see
:mod:`refopt.testing.reference` for the definitions)::

    embeddings                   the input of decoder layer 0
    layers.{i}.attention_input   the input of layers[i].self_attn.q_proj
    layers.{i}.attention_output  the output of layers[i].self_attn.out_proj
    layers.{i}.mlp_input         the input of layers[i].fc1   (transformers flattens it to [B*S, D])
    layers.{i}.mlp_output        the output of layers[i].fc2
    layers.{i}.output            the output of layers[i]
    final_norm                   the output of decoder.final_layer_norm
    hidden                       the output of decoder.project_out

Gradients come from autograd on the fixtures' loss; ``greedy`` from ``model.generate`` (its KV
cache); the tokenizer from ``AutoTokenizer`` when the directory holds a transformers tokenizer
config, else ``GPT2Tokenizer`` with OPT's special tokens; a sampler step runs transformers' own
logits warpers (``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``) and then the
common selection rule.
"""

from __future__ import annotations

import inspect
import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from refopt.config import OPTConfig
from refopt.io import huggingface
from refopt.testing import residency
from refopt.testing.adapter import Adapter, NotSupported
from refopt.testing.spill import KeyedMapping


def _imports():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise NotSupported(f"the transformers adapter needs torch and transformers, which are not "
                           f"installed ({e.name} is missing; pip install 'refopt[peers]')") from None
    return torch, transformers


class _Renamed(KeyedMapping):
    """transformers' gradients under refopt's names (``names``: ours -> theirs), looked up lazily;
    the position table without transformers' two offset rows; a parameter autograd did not reach
    has a zero gradient of its shape."""

    def __init__(self, theirs, names, shapes):
        self._theirs, self._shapes = theirs, shapes
        self._names = {ours: hf for ours, hf in names.items() if hf in shapes}
        if huggingface.POSITIONS_NAME in shapes:
            self._names["embed_positions"] = huggingface.POSITIONS_NAME
        self._keys = self._names

    def __getitem__(self, name):
        hf = self._names[name]
        g = self._theirs[hf] if hf in self._theirs else np.zeros(self._shapes[hf], np.float32)
        return g[huggingface.POSITION_OFFSET:] if name == "embed_positions" else g

    def shape(self, name) -> tuple:
        hf = self._names[name]
        shape = self._shapes[hf]
        return (shape[0] - huggingface.POSITION_OFFSET, *shape[1:]) if name == "embed_positions" else shape

    def rows(self, name, start, stop):
        """``self[name][start:stop]``, reading only those rows from a spill."""
        hf = self._names[name]
        if hf not in self._theirs:
            return self[name][start:stop]
        if name == "embed_positions":
            o = huggingface.POSITION_OFFSET
            start, stop = start + o, stop + o
        read = getattr(self._theirs, "rows", None)
        return read(hf, start, stop) if read is not None else self._theirs[hf][start:stop]


class TransformersAdapter(Adapter):
    """transformers' ``OPTForCausalLM`` in ``dtype`` (``"float32"`` or ``"float64"``) with
    ``attn_implementation`` ``"sdpa"`` (the default: PyTorch picks its kernel, the flash kernel on
    CPU where it can), ``"eager"`` (transformers' own matmul-softmax-matmul), ``"sdpa-math"`` or
    ``"sdpa-flash"`` (SDPA held to one PyTorch kernel), on ``threads`` PyTorch threads while it
    computes (default 1; ``None``: PyTorch's own count).  ``spill_gradients``: hand each gradient
    over to a :class:`refopt.testing.spill.GradientSpill` as autograd produces it and free it in
    PyTorch (default: when the gradients would take more than :attr:`SPILL_BYTES`), so a real-size
    model's gradient check holds one gradient at a time, not all of them.  ``drop_pages``: a model
    loaded from a checkpoint's files (:meth:`load_preset`) keeps resident only the pages of them it
    is using (:mod:`refopt.testing.residency`; default: when its parameters take more than
    :attr:`SPILL_BYTES`)."""

    supports_left_padding = True
    sampler_convention = "transformers"
    capabilities = frozenset({"logits", "left_padding", "activations", "gradients", "incremental",
                              "generation", "tokenizer", "samplers"})
    KERNELS = {"sdpa-math": "MATH", "sdpa-flash": "FLASH_ATTENTION"}

    def __init__(self, dtype: str = "float32", attn_implementation: str = "sdpa",
                 spill_gradients: bool | None = None, threads: int | None = 1,
                 drop_pages: bool | None = None):
        self.torch, self.transformers = _imports()
        if dtype not in ("float32", "float64", "bfloat16", "float16"):
            raise ValueError(f"TransformersAdapter: dtype={dtype!r}")
        if attn_implementation not in ("sdpa", "eager", *self.KERNELS):
            raise ValueError(f"TransformersAdapter: attn_implementation={attn_implementation!r}; expected "
                             f"'sdpa', 'eager', {', '.join(map(repr, self.KERNELS))}")
        self.dtype = dtype
        self.name = (f"transformers {self.transformers.__version__} (torch {self.torch.__version__.split('+')[0]}"
                     f"{'' if attn_implementation == 'sdpa' else ', ' + attn_implementation})")
        self.attn_implementation = attn_implementation
        self.spill_gradients = spill_gradients
        self.drop_pages = drop_pages
        self.threads = threads
        self.model = None
        self.tokenizer = None
        self._pages = None               # the checkpoint's pages, where the model maps its weights

    @property
    def torch_dtype(self):
        return getattr(self.torch, self.dtype)

    # ------------------------------------------------------------------ the model
    def _hf_config(self, cfg: OPTConfig):
        data = {k: v for k, v in cfg.to_huggingface().items() if k not in ("architectures", "model_type", "dtype")}
        data["dropout"] = 0.0
        return self.transformers.OPTConfig(**data)

    def load(self, config, params):
        torch = self.torch
        self.config = config
        # built in the compute dtype first: loading float64 values into float32 parameters would
        # round them before a later .to(float64)
        model = self.transformers.OPTForCausalLM(self._hf_config(config)).to(self.torch_dtype)
        state = {k: torch.tensor(np.asarray(v, np.float64)) for k, v in
                 huggingface.to_state_dict(params, config).items()}
        state["lm_head.weight"] = state["model.decoder.embed_tokens.weight"]
        model.load_state_dict(state, strict=True)
        self._set_model(model)

    def load_preset(self, path):
        from refopt.testing.adapters import transformers_config

        config = transformers_config(path, "transformers")
        logging = self.transformers.utils.logging
        bar = logging.is_progress_bar_enabled()
        logging.disable_progress_bar()                    # no "Loading weights" bar in reports
        try:
            model = self.transformers.OPTForCausalLM.from_pretrained(
                path, dtype=self.torch_dtype,
                attn_implementation="eager" if self.attn_implementation == "eager" else "sdpa")
        finally:
            if bar:
                logging.enable_progress_bar()
        self.config = config
        self._set_model(model)
        self._pages = None
        if self.drop_pages or (self.drop_pages is None and self._large(self.model.parameters())):
            self._pages = residency.Pages(residency.mapped_files(path))
            self._pages.release()

    @contextmanager
    def _pass(self):
        """One pass of the port over its weights.  A model mapped from its checkpoint's files keeps
        only the pages it is using resident (:mod:`refopt.testing.residency`): each decoder layer's
        pages are dropped as soon as the layer has run, and all of them after the pass -- the
        oracle's reference reads the same files a layer at a time, and the port's copy of every
        page beside it would double them.  The pages stay in the page cache; the next use maps
        them again from there."""
        pages = self._pages
        if pages is None or not pages.check():
            yield
            return
        def dropped(*_):
            pages.drop()          # (a forward hook's return value would replace the layer's output)

        handles = [layer.register_forward_hook(dropped) for layer in self.model.model.decoder.layers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            pages.release()

    def _set_model(self, model):
        model.config._attn_implementation = "eager" if self.attn_implementation == "eager" else "sdpa"
        self.model = model.to(self.torch_dtype).eval()

    @contextmanager
    def _threads(self):
        # PyTorch's intra-op threads while the port computes, the caller's count restored after:
        # the oracle's batches are a few tokens, where a second thread gains little and, with a
        # core taken by other work, the two wait for each other on every small product (a 125m
        # conform with both cores busy: 65 s on PyTorch's default two threads, 31 s on one)
        if self.threads is None or self.torch.get_num_threads() == self.threads:
            yield
            return
        before = self.torch.get_num_threads()
        self.torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            self.torch.set_num_threads(before)

    def _run(self, **inputs):
        # the model's forward, under the SDPA kernel this adapter is held to
        kernel = self.KERNELS.get(self.attn_implementation)
        with self._threads():
            if kernel is None:
                return self.model(**inputs)
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(getattr(SDPBackend, kernel)):
                return self.model(**inputs)

    def _inputs(self, token_ids, padding_mask):
        torch = self.torch
        return (torch.tensor(np.asarray(token_ids, np.int64)),
                torch.tensor(np.asarray(padding_mask).astype(np.int64)))

    def logits(self, token_ids, padding_mask):
        ids, mask = self._inputs(token_ids, padding_mask)
        with self.torch.no_grad(), self._pass():
            out = self._run(input_ids=ids, attention_mask=mask)
        return out.logits.double().numpy()

    def incremental_logits(self, token_ids, padding_mask, prefill):
        # a prefill filling transformers' cache, then one token per call with the cache
        ids, mask = self._inputs(token_ids, padding_mask)
        # transformers >= 5.24 names the cache `cache`, earlier versions `past_key_values`
        key = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        out = []
        with self.torch.no_grad(), self._pass():
            step = self._run(input_ids=ids[:, :prefill], attention_mask=mask[:, :prefill], use_cache=True)
            out.append(step.logits)
            for s in range(prefill, ids.shape[1]):
                step = self._run(input_ids=ids[:, s:s + 1], attention_mask=mask[:, :s + 1],
                                 use_cache=True, **{key: getattr(step, key)})
                out.append(step.logits)
        return self.torch.cat(out, dim=1).double().numpy()

    def activations(self, token_ids, padding_mask, names):
        torch = self.torch
        ids, mask = self._inputs(token_ids, padding_mask)
        B, S = ids.shape
        decoder = self.model.model.decoder
        got: dict = {}
        handles = []

        def keep(name, value):
            if isinstance(value, (tuple, list)):
                value = value[0]
            got[name] = value.detach().double().reshape(B, S, -1).numpy()

        def on_input(name):
            def hook(module, args, kwargs):
                keep(name, args[0] if args else kwargs["hidden_states"])
            return hook

        def on_output(name):
            def hook(module, args, output):
                keep(name, output)
            return hook

        try:
            if decoder.layers:
                handles.append(decoder.layers[0].register_forward_pre_hook(on_input("embeddings"),
                                                                             with_kwargs=True))
            for i, layer in enumerate(decoder.layers):
                p = f"layers.{i}."
                handles += [
                    layer.self_attn.q_proj.register_forward_pre_hook(on_input(p + "attention_input"),
                                                                     with_kwargs=True),
                    layer.self_attn.out_proj.register_forward_hook(on_output(p + "attention_output")),
                    layer.fc1.register_forward_pre_hook(on_input(p + "mlp_input"), with_kwargs=True),
                    layer.fc2.register_forward_hook(on_output(p + "mlp_output")),
                    layer.register_forward_hook(on_output(p + "output"))]
            if decoder.final_layer_norm is not None:
                handles.append(decoder.final_layer_norm.register_forward_hook(on_output("final_norm")))
            if decoder.project_out is not None:
                handles.append(decoder.project_out.register_forward_hook(on_output("hidden")))
            with torch.no_grad(), self._pass():
                got["logits"] = self._run(input_ids=ids, attention_mask=mask).logits.double().numpy()
        finally:
            for h in handles:
                h.remove()
        return {n: got[n] for n in names if n in got}

    def loss_and_gradients(self, token_ids, padding_mask):
        from refopt.testing.reference import loss_targets

        torch = self.torch
        ids, mask = self._inputs(token_ids, padding_mask)
        y, sw = loss_targets(token_ids, padding_mask, self.config.pad_token_id)
        self.model.zero_grad(set_to_none=True)
        params = dict(self.model.named_parameters())
        half = self.dtype in ("bfloat16", "float16")

        def as_numpy(g):
            # float32 / float64 as they are (a view, no copy); half precision widened to float32,
            # which NumPy can hold
            return (g.float() if half else g).numpy()

        spill = shares = None
        handles, untied = [], []
        if self._spills(params):
            # each gradient leaves PyTorch as soon as autograd has accumulated it and is freed
            # there: the port never holds all of its gradients at once
            from refopt.testing.spill import GradientSpill

            spill = GradientSpill()
            untied = self._untie_shared(params)
            shares = GradientSpill() if untied else None

            def hand_over(name, into):
                def hook(p):
                    into.put(name, as_numpy(p.grad))
                    p.grad = None
                    if self._pages is not None:
                        self._pages.drop()      # the weights the backward has gone past (see _pass)
                return hook
            tied = {name for name, _, _ in untied}
            handles = [p.register_post_accumulate_grad_hook(hand_over(n, shares if n in tied else spill))
                       for n, p in params.items() if p.requires_grad]
            handles += [leaf.register_post_accumulate_grad_hook(hand_over(f"{name}#{k}", shares))
                        for k, (name, _, leaf) in enumerate(untied) if leaf.requires_grad]
        try:
            with self._pass():
                logits = self._run(input_ids=ids, attention_mask=mask).logits
                ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                       torch.tensor(y).reshape(-1), reduction="none")
                w = torch.tensor(sw, dtype=logits.dtype).reshape(-1)
                loss = (w * ce).sum() / w.sum()
                del logits, ce
                with self._threads():
                    loss.backward()
        finally:
            for h in handles:
                h.remove()
            self._retie(untied)
        if untied:
            self._sum_shares(spill, shares, params, untied, as_numpy)
        theirs = spill if spill is not None else {
            name: as_numpy(p.grad) for name, p in params.items() if p.grad is not None}
        self.model.zero_grad(set_to_none=True)
        grads = _Renamed(theirs, huggingface.name_map(self.config),
                         {n: tuple(p.shape) for n, p in params.items()})
        return float(loss.detach()), grads

    def _untie_shared(self, params):
        """Give each further use of a shared parameter (OPT's token table, also the LM head's
        weight) a leaf of its own over the same storage, so that autograd hands over each use's
        share of the gradient as soon as it is produced -- tied, the head's share (the size of the
        table) waits in autograd until the embedding's arrives, and the two are summed in a third
        table-sized tensor. ``[(name, (module, attribute), leaf)]``, undone by :meth:`_retie`."""
        torch = self.torch
        first = {id(p): n for n, p in params.items()}
        seen, untied = set(), []
        for module in self.model.modules():
            for attr, p in list(module._parameters.items()):
                if p is None or id(p) not in first or p.dim() == 0:
                    continue
                if id(p) not in seen:
                    seen.add(id(p))
                    continue
                leaf = torch.nn.Parameter(p.detach(), requires_grad=p.requires_grad)
                module._parameters[attr] = leaf
                untied.append((first[id(p)], (module, attr, p), leaf))
        return untied

    @staticmethod
    def _retie(untied):
        for _, (module, attr, p), _ in untied:
            module._parameters[attr] = p

    def _sum_shares(self, spill, shares, params, untied, as_numpy, rows: int = 2048):
        """Each untied parameter's gradient into ``spill``: its shares summed as autograd sums a
        tied parameter's, in the parameter's dtype (PyTorch's CPU ``add``, so the same bits),
        ``rows`` rows at a time, handed over as ``as_numpy`` hands over every gradient."""
        torch = self.torch
        for name in dict.fromkeys(name for name, _, _ in untied):
            parts = [n for n in [name, *(f"{name}#{k}" for k, u in enumerate(untied) if u[0] == name)]
                     if n in shares]
            if not parts:
                continue
            dtype, shape = params[name].dtype, shares.shape(parts[0])

            def blocks():
                for start in range(0, shape[0], rows):
                    total = None
                    for n in parts:      # in the order autograd would add them (two: either order)
                        block = torch.from_numpy(shares.rows(n, start, start + rows)).to(dtype)
                        total = block if total is None else total + block
                    yield as_numpy(total)
            spill.put_parts(name, as_numpy(torch.empty(0, dtype=dtype)).dtype, shape, blocks())
        shares.close()

    #: a model whose gradients take more bytes than this hands them over one by one (GradientSpill),
    #: and one loaded from its files keeps only the pages it is using resident
    SPILL_BYTES = 64 << 20

    def _spills(self, params) -> bool:
        if self.spill_gradients is not None:
            return bool(self.spill_gradients)
        return self._large(params.values())

    def _large(self, params) -> bool:
        return sum(p.numel() * p.element_size() for p in params) > self.SPILL_BYTES

    def greedy(self, prompt_ids, max_new_tokens):
        torch = self.torch
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
        gen = self.transformers.GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens,
                                                 min_new_tokens=0, eos_token_id=None,
                                                 pad_token_id=self.config.pad_token_id,
                                                 bos_token_id=self.config.bos_token_id)
        # transformers 5 fills a None eos_token_id from the model's generation config: no stop token
        # means clearing it there too
        saved, self.model.generation_config.eos_token_id = self.model.generation_config.eos_token_id, None
        try:
            with torch.no_grad(), self._threads(), self._pass():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
        finally:
            self.model.generation_config.eos_token_id = saved
        return [int(t) for t in out[0, len(prompt_ids):]]

    # ------------------------------------------------------------------ the tokenizer
    def load_tokenizer(self, vocabulary_path, merges_path):
        folder = Path(vocabulary_path).parent
        if (folder / "tokenizer_config.json").exists() or (folder / "tokenizer.json").exists():
            self.tokenizer = self.transformers.AutoTokenizer.from_pretrained(str(folder))
        else:
            special = dict(bos_token="</s>", eos_token="</s>", unk_token="</s>", pad_token="<pad>",
                           add_bos_token=True)
            cls = self.transformers.GPT2Tokenizer
            if "vocab" in inspect.signature(cls.__init__).parameters:     # transformers >= 5
                vocab = json.loads(Path(vocabulary_path).read_text(encoding="utf-8"))
                with open(merges_path, encoding="utf-8") as f:
                    merges = [tuple(line.rstrip("\n").split(" ")) for line in f
                              if line.strip() and not line.startswith("#version")]
                self.tokenizer = cls(vocab=vocab, merges=merges, **special)
            else:
                self.tokenizer = cls(vocab_file=str(vocabulary_path), merges_file=str(merges_path), **special)

    def encode(self, texts):
        if self.tokenizer is None:
            raise NotSupported("no tokenizer loaded")
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]]

    def decode(self, ids):
        if self.tokenizer is None:
            raise NotSupported("no tokenizer loaded")
        return [self.tokenizer.decode([int(i) for i in row], skip_special_tokens=True,
                                      clean_up_tokenization_spaces=False) for row in ids]

    # ------------------------------------------------------------------ the samplers
    def sample(self, spec, probabilities, uniforms):
        from refopt.philox import choose

        torch, lp = self.torch, self.transformers.generation.logits_process
        p = torch.tensor(np.asarray(probabilities), dtype=self.torch_dtype)
        scores = torch.log(p)
        if spec.name == "greedy":
            return torch.argmax(scores, dim=-1).numpy()
        warpers = []
        if spec.temperature != 1.0:
            warpers.append(lp.TemperatureLogitsWarper(spec.temperature))
        if spec.k is not None and spec.name in ("top_k", "top_p"):
            warpers.append(lp.TopKLogitsWarper(spec.k))
        if spec.name == "top_p":
            warpers.append(lp.TopPLogitsWarper(spec.p))
        dummy = torch.zeros((p.shape[0], 1), dtype=torch.long)
        for warper in warpers:
            scores = warper(dummy, scores)
        weights = torch.softmax(scores.double(), dim=-1).numpy()
        return choose(weights, uniforms)
