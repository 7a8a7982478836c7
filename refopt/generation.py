"""Text generation: KerasHub's ``generate`` (prefill, per-token decode with the KV cache, stop
tokens, output padding mask, ``strip_prompt``), plus streaming and per-token log-probabilities.

``OPTCausalLM.generate`` / ``OPTCausalLM.stream`` delegate here.  What the model must provide:

* ``call_with_cache(token_ids [B, S], cache, cache_update_index, padding_mask=None)
  -> (logits [B, S, V], hidden_states [B, S, E], cache)``
* ``new_cache(batch, length)`` -> a zero KV cache ``[B, L, 2, T, H, K]``
* ``backbone.config`` (an ``OPTConfig``), ``preprocessor`` (or None), ``sampler``

KerasHub's decoding, step by step (``generate_step``):

1. The prompt is right-padded to ``T`` (``max_length``, or the preprocessor's ``sequence_length``).
   ``index`` starts at the *shortest* prompt length; rows with longer prompts keep their own
   tokens wherever ``padding_mask`` is 1.  Positions are absolute (0, 1, 2, ...).
2. Prefill: one pass over positions ``0 .. index-1`` fills the KV cache and the hidden states
   (only the causal mask applies, as in KerasHub; padding never precedes a real token).
3. Decode: ``next(prompt, cache, index)`` feeds the token at ``index - 1`` (cache index ``index -
   1``) and returns the logits for ``index``; the sampler chooses, writes and advances, until ``T``
   or, with ``stop_token_ids``, until every row has produced a stop token.
4. Output padding mask: True up to and including each row's first generated stop token, False
   after it (all True when ``stop_token_ids`` is None).

Differences from KerasHub, on purpose: prompts that leave no room to generate, or longer than the
model's ``max_sequence_length``, raise :class:`refopt.errors.InputError`; a dict input may be
unbatched (1-D, returned unbatched); a ``BeamSampler(return_all_beams=True)`` returns every beam
(see :func:`generate`).
"""

from __future__ import annotations

import inspect
from typing import Iterator, NamedTuple

import numpy as np

from refopt.errors import InputError, InputTypeError, SamplerError
from refopt.ops.sampling import output_padding_mask
from refopt.tokenizers.inputs import is_strings

AUTO = "auto"


# ---------------------------------------------------------------------------------- arguments
def resolve_stop_token_ids(model, stop_token_ids):
    """``"auto"`` -> the tokenizer's end token(s); None -> None; ids -> a tuple of ints."""
    if isinstance(stop_token_ids, str):
        if stop_token_ids != AUTO:
            raise InputTypeError(f'stop_token_ids={stop_token_ids!r}; expected "auto", None or a '
                                 "tuple of token ids")
        preprocessor = getattr(model, "preprocessor", None)
        if preprocessor is None:
            raise InputError(
                'A `preprocessor` must be attached to the model if `stop_token_ids="auto"`. '
                "Currently `preprocessor=None`. To call `generate()` with preprocessing detached, "
                "either pass `stop_token_ids=None` to always generate until `max_length` or pass a "
                "tuple of token ids that should terminate generation as `stop_token_ids`.")
        tokenizer = preprocessor.tokenizer
        ids = [tokenizer.end_token_id]
        if getattr(tokenizer, "end_token2_id", None) is not None:
            ids.append(tokenizer.end_token2_id)
        return tuple(int(i) for i in ids)
    if stop_token_ids is None:
        return None
    if isinstance(stop_token_ids, (int, np.integer)) and not isinstance(stop_token_ids, bool):
        stop_token_ids = (stop_token_ids,)
    try:
        ids = tuple(stop_token_ids)
    except TypeError:
        raise InputTypeError(f"stop_token_ids={stop_token_ids!r}; expected \"auto\", None or a tuple "
                             "of token ids") from None
    vocab = model.backbone.config.vocabulary_size
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise InputTypeError(f"stop_token_ids: {i!r} is not an integer token id")
        if not 0 <= int(i) < vocab:
            raise InputError(f"stop_token_ids: id {int(i)} is out of range [0, {vocab})")
    return tuple(int(i) for i in ids)


def _check_max_length(model, max_length):
    if max_length is None:
        return None
    cfg = model.backbone.config
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 1:
        raise InputError(f"max_length={max_length!r}; expected a positive integer")
    if max_length > cfg.max_sequence_length:
        raise InputError(f"max_length={int(max_length)} exceeds the model's max_sequence_length "
                         f"{cfg.max_sequence_length}")
    return int(max_length)


def check_generation_inputs(model, token_ids, padding_mask):
    """Validate a ``{"token_ids", "padding_mask"}`` batch for generation; returns (int64 [B, T],
    bool [B, T]).  Each row must be right-padded, hold at least one prompt token and leave room for
    at least one new token; ``T`` may not exceed ``max_sequence_length``."""
    cfg = model.backbone.config
    try:
        ids = np.asarray(token_ids)
    except ValueError:
        raise InputError("token_ids: rows of different lengths; pad them and pass a padding_mask") from None
    if ids.dtype == object or not np.issubdtype(ids.dtype, np.integer):
        raise InputTypeError(f"token_ids: expected integer token ids, got dtype {ids.dtype}")
    if ids.ndim != 2 or ids.shape[0] == 0:
        raise InputError(f"token_ids: expected shape (batch, sequence), got {ids.shape}")
    B, T = ids.shape
    if padding_mask is None:
        raise InputError("padding_mask: required to generate (1 for prompt tokens, 0 for the "
                         "positions to generate)")
    mask = np.asarray(padding_mask)
    if mask.shape != ids.shape:
        raise InputError(f"padding_mask: shape {mask.shape} differs from token_ids' {ids.shape}")
    if not (mask.dtype == bool or (np.issubdtype(mask.dtype, np.integer) and np.isin(mask, (0, 1)).all())):
        raise InputError("padding_mask: expected booleans or 0/1 integers")
    mask = mask.astype(bool)
    if (ids < 0).any() or (ids >= cfg.vocabulary_size).any():
        bad = ids[(ids < 0) | (ids >= cfg.vocabulary_size)][0]
        raise InputError(f"token_ids: id {bad} is out of range [0, {cfg.vocabulary_size})")
    if T > cfg.max_sequence_length:
        raise InputError(f"token_ids: sequence length {T} (max_length) exceeds the model's "
                         f"max_sequence_length {cfg.max_sequence_length}")
    lengths = mask.sum(axis=1)
    for b in range(B):
        if lengths[b] == 0:
            raise InputError(f"padding_mask: row {b} has no prompt token; generation needs at least one")
        if not mask[b, :lengths[b]].all():
            raise InputError(f"padding_mask: row {b} is not right-padded (KerasHub's generation "
                             "expects prompt tokens first, then padding)")
        if lengths[b] >= T:
            raise InputError(f"max_length={T} is not above the prompt: row {b} already has "
                             f"{lengths[b]} tokens, leaving no room to generate; raise max_length")
    return ids.astype(np.int64), mask


# ---------------------------------------------------------------------------------- decoding
def prefill(model, token_ids, index):
    """The KV cache ``[B, L, 2, T, H, K]`` filled for positions ``0 .. index-1`` and the hidden states
    ``[B, T, E]`` there (zeros beyond)."""
    B, T = token_ids.shape
    cache = model.new_cache(B, T)
    # the prompt's logits are never used (the first step runs its last token again): skipped where
    # the model can (an LM head over every prompt position, compute-bound, cost a 125m int8 model
    # ~7 ms of a 200 ms generation of 32 tokens)
    skip = "logits" in inspect.signature(model.call_with_cache).parameters
    _, hidden, cache = model.call_with_cache(token_ids[:, :index], cache, 0,
                                             **({"logits": False} if skip else {}))  # [B, index, E]
    hidden_states = np.zeros((B, T, hidden.shape[-1]), hidden.dtype)
    hidden_states[:, :index] = hidden
    return cache, hidden_states


def make_next(model):
    """KerasHub's ``next(prompt, cache, index)``: feed the token at ``index - 1``, get the logits
    ``[B, V]`` and hidden states ``[B, E]`` for ``index``."""
    def next(prompt, cache, index):
        logits, hidden, cache = model.call_with_cache(prompt[:, index - 1:index], cache, index - 1)
        return logits[:, 0], hidden[:, 0], cache
    # several greedy steps in one call where the model's backend compiles them (the Numba
    # backend: OPTCausalLM.greedy_steps); a GreedySampler's loop takes them (same tokens).  Only
    # the model's own: an object that wraps a model (and, say, its call_with_cache) sees every step
    greedy = getattr(model, "greedy_steps", None)
    next.greedy_steps = greedy if getattr(greedy, "__self__", None) is model else None
    return next


def prepare(model):
    """Get the kernels that generating with ``model`` needs ready without making the caller wait:
    on a backend that compiles them (Numba), compile them -- or load them from Numba's on-disk
    cache -- on a background thread, the NumPy ops serving this process meanwhile (see
    :mod:`refopt.kernels.cpu.warmup`).  Returns the background job (``.running``, ``.wait()``),
    or None when the model's backend has nothing to prepare."""
    ops = model.backbone.ops
    warm_up = getattr(ops, "warm_up", None)
    if warm_up is None:
        return None
    cfg = model.backbone.config

    def exercise():
        # small calls of the types a generation makes: a one-token step and a prompt of 2 tokens
        # (the compiled decode step), a prompt of 17 op by op as one longer than the step takes
        # goes (refopt.model.forward: per-op kernels, attention on BLAS from 8 queries, float32
        # products on BLAS from 17 rows -- 9 rows compiled a float32 product no generation then
        # used, 20 s more of background compiling -- and the LM head), and the samplers'
        # selection steps
        from refopt import model as _model

        for length in (1, min(2, cfg.max_sequence_length)):
            model.call_with_cache(np.zeros((1, length), np.int64), model.new_cache(1, length), 0)
        # the compiled step on the calling thread alone too: a step the governor runs on one thread
        # (its comparisons, a busy machine) calls it directly, and its first such call loaded it
        # from the cache in the middle of a generation (47-56 ms where a step takes 8-11; session 22)
        step = getattr(ops, "decode_step", None)
        if step is not None and not getattr(model.backbone, "lora_enabled", False):
            step(model.backbone.params, cfg, np.zeros((1, 1), np.int64), np.ones((1, 1), bool),
                 model.new_cache(1, 1), 0, threads=1)
        length = min(17, cfg.max_sequence_length)
        params = model.backbone.params
        hidden = _model.forward(params, cfg, np.zeros((1, length), np.int64), np.ones((1, length), bool),
                                cache=model.new_cache(1, length), cache_index=0, ops=ops)
        ops.lm_head_forward(hidden, params["embed_tokens"])
        p = np.full((1, 4), 0.25)
        ops.choose(p, ops.uniform(np.zeros(1, np.uint64), 0))
        ops.top_k_mask(p, 2)
        ops.top_p_distribution(p, 0.5)
        ops.min_p_distribution(p, 0.1)

    return warm_up(exercise)


def _start(model, token_ids, padding_mask, sampler):
    sampler = sampler if sampler is not None else _model_sampler(model)
    if hasattr(sampler, "check_model"):
        sampler.check_model(model)
    index = int(padding_mask.sum(axis=1).min())
    cache, hidden_states = prefill(model, token_ids, index)
    return sampler, index, cache, hidden_states


def _seed_kwargs(sampler, seed):
    """``{"seed": seed}`` for a sampler that draws random numbers when a seed is given, else {}
    (samplers that choose deterministically ignore seeds)."""
    if seed is None or not getattr(sampler, "stochastic", False):
        return {}
    from refopt.philox import check_seeds

    return {"seed": check_seeds(seed)}


def _on_cuda(model) -> bool:
    """Whether ``model`` runs on the cuda backend (its own choice, else the current one) and can
    take its device-resident loop: that loop computes in float32 with the base weights, so a model
    with a half-precision dtype policy or LoRA adapters decodes on the host loop instead."""
    from refopt import backend

    if backend.resolve(getattr(model, "backend", None)) != "cuda":
        return False
    bb = getattr(model, "backbone", None)
    return not (bb is not None and (bb.config.policy.reduced or getattr(bb, "lora_enabled", False)))


def _model_sampler(model):
    from refopt.samplers import get

    sampler = getattr(model, "sampler", None)
    return get("top_k") if sampler is None else get(sampler)


def generate_step(model, inputs, stop_token_ids=None, sampler=None, seed=None):
    """KerasHub's ``generate_step`` on one batch ``{"token_ids" [B, T], "padding_mask" [B, T]}``:
    returns ``{"token_ids", "padding_mask"}`` (int64 / bool ``[B, T]``).  With
    ``BeamSampler(return_all_beams=True)`` both are ``[B, num_beams, T]`` and ``"log_probs"``
    ``[B, num_beams]`` (each beam's log-likelihood) is added, best beam first.  ``seed``: the
    random samplers' seed for this call, an integer or one per row (see :func:`generate`)."""
    token_ids, padding_mask = inputs["token_ids"], inputs["padding_mask"]
    if _on_cuda(model):                   # the cuda backend's device-resident loop, when it applies
        from refopt import device_decoding

        chosen = sampler or _model_sampler(model)
        if device_decoding.supports(model, chosen):
            return device_decoding.generate_step(model, token_ids, padding_mask, stop_token_ids, chosen,
                                                 **_seed_kwargs(chosen, seed))
    sampler, index, cache, hidden_states = _start(model, token_ids, padding_mask, sampler)
    out = sampler(next=make_next(model), prompt=token_ids, cache=cache, index=index,
                  mask=padding_mask, stop_token_ids=stop_token_ids, hidden_states=hidden_states,
                  model=model, **_seed_kwargs(sampler, seed))
    if isinstance(out, tuple):                                                 # every beam
        beams, scores = out
        B, nb, T = beams.shape
        mask = output_padding_mask(beams.reshape(B * nb, T), np.repeat(padding_mask, nb, axis=0),
                                   stop_token_ids).reshape(B, nb, T)
        return {"token_ids": beams.astype(np.int64), "padding_mask": mask, "log_probs": scores}
    out = np.asarray(out).astype(np.int64)
    return {"token_ids": out, "padding_mask": output_padding_mask(out, padding_mask, stop_token_ids)}


def strip_prompt_outputs(outputs, prompt_mask):
    """KerasHub's ``strip_prompt``: roll each row left by its prompt length, so generated tokens come
    first; the mask keeps generated positions only (``roll(prompt) xor roll(output)``)."""
    T = prompt_mask.shape[-1]
    shifts = np.mod(-prompt_mask.sum(axis=-1), T)                              # [B]
    ix = np.mod(np.arange(T)[None, :] - shifts[:, None], T)                    # [B, T]
    roll = lambda x: np.take_along_axis(x, ix, axis=1)                          # noqa: E731
    return {"token_ids": roll(outputs["token_ids"]),
            "padding_mask": np.logical_xor(roll(prompt_mask), roll(outputs["padding_mask"]))}


# ---------------------------------------------------------------------------------- generate
def _generation_inputs(model, inputs, max_length):
    """Inputs -> (token_ids [B, T], padding_mask [B, T], input_is_scalar)."""
    preprocessor = getattr(model, "preprocessor", None)
    if preprocessor is not None:
        if isinstance(inputs, dict):
            raise InputTypeError("generate: this model has a preprocessor, so inputs are strings (a "
                                 "string or a list of strings); to pass token ids, set "
                                 "model.preprocessor = None")
        if not is_strings(inputs, arrays=False):
            raise InputTypeError(f"generate: expected a string or a list of strings, got "
                                 f"{type(inputs).__name__}")
        scalar = isinstance(inputs, str)
        x = preprocessor.generate_preprocess([inputs] if scalar else list(inputs),
                                             sequence_length=max_length)
        return np.asarray(x["token_ids"]), np.asarray(x["padding_mask"]), scalar
    if not isinstance(inputs, dict):
        kind = "strings" if is_strings(inputs, arrays=False) else type(inputs).__name__
        raise InputTypeError(f"generate: got {kind} but this model has no preprocessor; pass "
                             "{'token_ids': ..., 'padding_mask': ...} or attach an "
                             "OPTCausalLMPreprocessor")
    unknown = set(inputs) - {"token_ids", "padding_mask"}
    if unknown or "token_ids" not in inputs:
        raise InputError(f"generate: expected keys 'token_ids' and 'padding_mask', got {sorted(inputs)}")
    ids = np.asarray(inputs["token_ids"])
    mask = inputs.get("padding_mask")
    scalar = ids.ndim == 1
    if scalar:
        ids = ids[None]
        mask = None if mask is None else np.asarray(mask)[None]
    return ids, mask, scalar


def generate(model, inputs, max_length=None, stop_token_ids=AUTO, strip_prompt=False, sampler=None,
             seed=None, generate_function=None):
    """KerasHub's ``CausalLM.generate``.

    Args:
        inputs: with a preprocessor, a string or a list of strings; without, a dict of
            ``token_ids`` and ``padding_mask`` ``[B, T]`` (right-padded; 1 marks prompt tokens),
            generated to length ``T``.
        max_length: with a preprocessor, the total length (prompt included) to generate to;
            default the preprocessor's ``sequence_length``.  Ignored without a preprocessor (as in
            KerasHub: pad the inputs to the length wanted).
        stop_token_ids: ``"auto"`` (the tokenizer's end token; an error without a preprocessor),
            None (generate to ``max_length``) or a tuple of ids, each of which stops a row.
        strip_prompt: return only the generated text / tokens.
        sampler: override ``model.sampler`` for this call.
        seed: the random samplers' seed for this call (per request, as vLLM's): an integer for
            every prompt, or a list with one integer (or None: a fresh seed) per prompt; default
            the sampler's own ``seed``.  A prompt's text depends only on the model, the prompt, its
            seed and the sampler's settings: the same prompt with the same seed gives the same
            text in any row of any batch, on any backend where the probabilities agree.  Ignored by
            samplers that make no random choice (greedy, beam, contrastive).
        generate_function: ``(inputs, stop_token_ids=...) -> outputs`` (and ``seed=`` when one is
            given) run on the batch instead of :func:`generate_step` (``CausalLM.generate`` passes
            ``make_generate_function()``).

    Returns strings (one string for a string input) or ``{"token_ids", "padding_mask"}`` arrays.
    With ``BeamSampler(return_all_beams=True)``: a list of ``num_beams`` strings per prompt (best
    first), or arrays ``[B, num_beams, T]`` and ``"log_probs"`` ``[B, num_beams]``.
    """
    preprocessor = getattr(model, "preprocessor", None)
    stop_token_ids = resolve_stop_token_ids(model, stop_token_ids)
    if preprocessor is not None:
        max_length = _check_max_length(model, max_length)
    token_ids, padding_mask, scalar = _generation_inputs(model, inputs, max_length)
    token_ids, padding_mask = check_generation_inputs(model, token_ids, padding_mask)
    batch = {"token_ids": token_ids, "padding_mask": padding_mask}
    if generate_function is not None and sampler is None:
        # KerasHub's signature (inputs, stop_token_ids); a seed only when one is asked for
        out = generate_function(batch, stop_token_ids=stop_token_ids,
                                **({} if seed is None else {"seed": seed}))
    else:
        out = generate_step(model, batch, stop_token_ids=stop_token_ids, sampler=sampler, seed=seed)
    beams = out["token_ids"].ndim == 3
    if beams:
        B, nb, T = out["token_ids"].shape
        log_probs = out.pop("log_probs")
        out = {k: v.reshape(B * nb, T) for k, v in out.items()}
        prompt_mask = np.repeat(padding_mask, nb, axis=0)
    else:
        prompt_mask = padding_mask
    if strip_prompt:
        out = strip_prompt_outputs(out, prompt_mask)
    if preprocessor is not None:
        texts = list(preprocessor.generate_postprocess(out))
        if beams:
            texts = [texts[b * nb:(b + 1) * nb] for b in range(B)]
        return texts[0] if scalar else texts
    if beams:
        out = {k: v.reshape(B, nb, T) for k, v in out.items()}
        out["log_probs"] = log_probs
    if scalar:
        out = {k: v[0] for k, v in out.items()}
    return out


# ---------------------------------------------------------------------------------- streaming
class TokenPiece(NamedTuple):
    """One generated token when streaming with ``return_logprobs=True``: its id, the text it
    completes (may be ``""`` while a multi-byte character is incomplete) and its log-probability
    under the sampler's processed, temperature-scaled distribution."""

    text: str
    token_id: int
    log_prob: float


def _detokenizer(preprocessor):
    from refopt import tokenizers

    tokenizer = preprocessor.tokenizer
    if hasattr(tokenizer, "incremental_detokenizer"):
        return tokenizer.incremental_detokenizer()
    return tokenizers.IncrementalDetokenizer(tokenizer)


def stream(model, prompt, max_length=None, stop_token_ids=AUTO, return_logprobs=False,
           sampler=None, seed=None) -> Iterator:
    """Generate from one string prompt, yielding the text as tokens are produced.

    Yields ``str`` pieces whose concatenation is the generated text (what ``generate(prompt,
    strip_prompt=True)`` returns with the same seed), or, with ``return_logprobs=True``, one
    :class:`TokenPiece` per generated token (then a final ``TokenPiece`` with ``token_id=-1`` if
    the detokenizer still holds text).  Stops after the first stop token (not shown, like the other
    special tokens) or at ``max_length``.  Samplers that only know their result at the end (beam
    search) yield everything then; their log-probabilities come from rescoring the result.
    ``seed`` is :func:`generate`'s (one integer).
    """
    preprocessor = getattr(model, "preprocessor", None)
    if preprocessor is None:
        raise InputError("stream: needs a model with a preprocessor (it tokenizes the prompt and "
                         "detokenizes the output)")
    if not isinstance(prompt, str):
        raise InputTypeError(f"stream: expected one string prompt, got {type(prompt).__name__}")
    stop_token_ids = resolve_stop_token_ids(model, stop_token_ids)
    max_length = _check_max_length(model, max_length)
    token_ids, padding_mask, _ = _generation_inputs(model, prompt, max_length)
    token_ids, padding_mask = check_generation_inputs(model, token_ids, padding_mask)
    steps = None
    if _on_cuda(model):                   # the cuda backend's device-resident loop, when it applies
        from refopt import device_decoding

        chosen = sampler or _model_sampler(model)
        if device_decoding.supports(model, chosen):
            steps = device_decoding.steps(model, token_ids, padding_mask, stop_token_ids, chosen,
                                          **_seed_kwargs(chosen, seed))
    if steps is None:
        sampler, index, cache, hidden_states = _start(model, token_ids, padding_mask, sampler)
    else:
        sampler = sampler or _model_sampler(model)
    if not hasattr(sampler, "steps"):
        raise SamplerError(f"stream: sampler {sampler!r} has no steps() generator; use a refopt "
                           "Sampler")
    detok = _detokenizer(preprocessor)
    special = set(int(i) for i in getattr(preprocessor.tokenizer, "special_token_ids", ()) or ())
    stop = set(stop_token_ids or ())
    if steps is None:
        steps = sampler.steps(make_next(model), token_ids, cache=cache, index=index, mask=padding_mask,
                              stop_token_ids=stop_token_ids, hidden_states=hidden_states, model=model,
                              log_probs=return_logprobs, **_seed_kwargs(sampler, seed))
    prompt_length = int(padding_mask[0].sum())
    stopped = False
    try:
        for step in steps:
            lps = step.log_probs
            if return_logprobs and lps is None:
                lps = _rescore(model, sampler, step, token_ids)
            for j, position in enumerate(range(step.start, step.stop)):
                if position < prompt_length:
                    continue
                token = int(step.token_ids[0, j])
                if token in stop:
                    stopped = True
                    break
                text = "" if token in special else detok.push(token)
                if return_logprobs:
                    yield TokenPiece(text, token, float(lps[0, j]))
                elif text:
                    yield text
            if stopped:
                break
    finally:
        steps.close()
    tail = detok.flush()
    if tail:
        yield TokenPiece(tail, -1, 0.0) if return_logprobs else tail


def _rescore(model, sampler, step, token_ids):
    # log-probabilities [1, n] of the tokens of `step` by one forward pass over the final sequence
    seq = token_ids.copy()
    seq[:, step.start:step.stop] = step.token_ids
    cache = model.new_cache(seq.shape[0], step.stop)
    logits, _, _ = model.call_with_cache(seq[:, :step.stop], cache, 0)       # [1, stop, V]
    out = np.zeros(step.token_ids.shape)
    for j, position in enumerate(range(step.start, step.stop)):
        processed = sampler.process_logits(logits[:, position - 1], seq, position)
        out[:, j] = sampler.token_log_probs(processed, seq[:, position])
    return out
