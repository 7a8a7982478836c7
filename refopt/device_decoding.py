"""The cuda backend's device-resident decode loop, seen from the generation side.

:mod:`refopt.generation` asks :func:`supports` whether a model and sampler can decode on the GPU
and then calls :func:`generate_step` or :func:`steps`; the kernels below them
(:class:`refopt.kernels.cuda.decode.DeviceModel`) know nothing of samplers or models: they take a
sampler *kind* and its parameters, the :class:`refopt.samplers.SamplerSpec` a sampler describes
itself with (:meth:`refopt.samplers.Sampler.device_spec`).

The device copy of a model's weights is owned here, one per backbone (:data:`_RESIDENT`, a weak
mapping: it lives as long as the backbone), and re-uploaded when the backbone's parameter arrays
are no longer the ones it was made from or an optimizer has updated them since (the ``version``
of the backbone's :class:`refopt.model.Parameters`).
"""

from __future__ import annotations

import weakref

import numpy as np

from refopt.ops.sampling import output_padding_mask


#: backbone -> (parameters' identity and version, DeviceModel)
_RESIDENT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _weights_fit(model) -> bool:
    # the decode kernels compute in float32 and hold the matrices as float32, bfloat16 or float16
    # (one kind for all of them: not int8, not float64)
    from refopt.kernels.cuda.decode import weights_kind

    backbone = model.backbone
    return (np.dtype(backbone.config.compute_dtype) == np.float32
            and weights_kind(backbone.params) is not None)


def supports(model, sampler) -> bool:
    """Whether ``model`` with ``sampler`` decodes on the device: float32 compute with float32,
    bfloat16 or float16 weights (the matrices stay two bytes a weight on the device) and a sampler
    whose rule has a device form (greedy, random, top-k, top-p, min-p; no logits processors)."""
    return sampler.device_spec() is not None and _weights_fit(model)


def resident(model):
    """The model's weights on the device (:class:`refopt.kernels.cuda.decode.DeviceModel`),
    uploaded on first use and kept while they are current (see the module docstring)."""
    from refopt.kernels.cuda.decode import DeviceModel

    backbone = model.backbone
    params = backbone.params
    key = (tuple((name, id(v)) for name, v in params.items()), id(params), getattr(params, "version", 0))
    held = _RESIDENT.get(backbone)
    if held is None or held[0] != key:
        held = _RESIDENT[backbone] = (key, DeviceModel(params, backbone.config))
    return held[1]


def _launch_args(model, sampler, batch, seed):
    spec = sampler.device_spec()
    dm = resident(model)
    kwargs = dict(spec.params)
    kwargs["seeds"] = sampler.begin(batch, model=model, seed=seed)    # one per row (None: greedy)
    if spec.kind == "top_p":                  # top-p's candidate cut: all tokens when k is None
        kwargs["k"] = dm.lay.V if kwargs.get("k") is None else min(kwargs["k"], dm.lay.V)
    return dm, spec.kind, kwargs


def generate_step(model, token_ids, padding_mask, stop_token_ids, sampler, seed=None):
    """KerasHub's ``generate_step`` on the device (:func:`refopt.generation.generate_step`; call
    only when :func:`supports`); ``seed``: this call's seed(s), else the sampler's."""
    dm, kind, kwargs = _launch_args(model, sampler, len(token_ids), seed)
    index = int(padding_mask.sum(axis=1).min())
    out = dm.decode(token_ids, padding_mask, index, kind, stop_token_ids=stop_token_ids,
                    steps_per_launch=16, **kwargs)
    return {"token_ids": out, "padding_mask": output_padding_mask(out, padding_mask, stop_token_ids)}


def steps(model, token_ids, padding_mask, stop_token_ids, sampler, seed=None):
    """The device loop as a generator of :class:`refopt.samplers.Step` (one per token, no
    log-probabilities), for streaming (call only when :func:`supports`)."""
    from refopt.samplers import Step

    dm, kind, kwargs = _launch_args(model, sampler, len(token_ids), seed)
    index = int(padding_mask.sum(axis=1).min())
    inner = dm.decode_iter(token_ids, padding_mask, index, kind, stop_token_ids=stop_token_ids,
                           steps_per_launch=1, **kwargs)
    while True:
        try:
            start, stop, toks = next(inner)
        except StopIteration as done:
            return done.value
        for j, position in enumerate(range(start, stop)):
            yield Step(position, position + 1, toks[:, j:j + 1], None)
