"""``get`` / ``serialize`` / ``deserialize``: samplers by name, object or config (KerasHub's API).

Names: KerasHub's ``"beam"``, ``"contrastive"``, ``"greedy"``, ``"random"``, ``"top_k"``,
``"top_p"``, plus refopt's ``"min_p"``, ``"typical"`` and ``"speculative"`` (which needs a
``draft_model`` set before ``generate``).  A config is KerasHub's ``serialize`` form,
``{"class_name": "keras_hub>TopKSampler" | "TopKSampler" | "top_k", "config": {...}}``.
"""

from __future__ import annotations

from refopt.errors import SamplerError
from refopt.samplers.beam_sampler import BeamSampler
from refopt.samplers.contrastive_sampler import ContrastiveSampler
from refopt.samplers.greedy_sampler import GreedySampler
from refopt.samplers.min_p_sampler import MinPSampler
from refopt.samplers.random_sampler import RandomSampler
from refopt.samplers.sampler import Sampler
from refopt.samplers.speculative_sampler import SpeculativeSampler
from refopt.samplers.top_k_sampler import TopKSampler
from refopt.samplers.top_p_sampler import TopPSampler
from refopt.samplers.typical_sampler import TypicalSampler

NAMES = {
    "beam": BeamSampler,
    "contrastive": ContrastiveSampler,
    "greedy": GreedySampler,
    "random": RandomSampler,
    "top_k": TopKSampler,
    "top_p": TopPSampler,
    "min_p": MinPSampler,
    "typical": TypicalSampler,
    "speculative": SpeculativeSampler,
}
_KERAS_HUB = {"beam", "contrastive", "greedy", "random", "top_k", "top_p", "speculative"}
_BY_CLASS_NAME = {cls.__name__: cls for cls in NAMES.values()}


def serialize(sampler) -> dict:
    """KerasHub's serialized form of a sampler: module, class name, config, registered name."""
    if not isinstance(sampler, Sampler):
        raise SamplerError(f"serialize: expected a refopt Sampler, got {type(sampler).__name__}")
    name = type(sampler).__name__
    builtin = _BY_CLASS_NAME.get(name) is type(sampler)
    short = next((k for k, v in NAMES.items() if v is type(sampler)), None)
    prefix = "keras_hub" if builtin and short in _KERAS_HUB else "refopt"
    return {"module": "keras_hub.samplers" if prefix == "keras_hub" else "refopt.samplers",
            "class_name": name, "config": sampler.get_config(),
            "registered_name": f"{prefix}>{name}"}


def _class_for(name: str):
    bare = name.split(">", 1)[-1]
    cls = NAMES.get(bare) or _BY_CLASS_NAME.get(bare)
    if cls is None:
        raise SamplerError(f"unknown sampler {name!r}; expected one of {sorted(NAMES)} "
                           f"(or their class names {sorted(_BY_CLASS_NAME)})")
    return cls


def deserialize(config, custom_objects=None):
    """A sampler from a name or a ``{"class_name", "config"}`` dict."""
    custom_objects = custom_objects or {}
    if isinstance(config, str):
        cls = custom_objects.get(config) or _class_for(config)
        return cls()
    if not isinstance(config, dict) or "class_name" not in config:
        raise SamplerError(f"cannot deserialize sampler from {config!r}: expected a name or a dict "
                           "with 'class_name' and 'config'")
    name = config["class_name"]
    cls = custom_objects.get(name) or _class_for(name)
    kwargs = dict(config.get("config") or {})
    try:
        return cls.from_config(kwargs)
    except TypeError as e:
        raise SamplerError(f"cannot build {cls.__name__} from config {kwargs}: {e}") from None


def get(identifier):
    """Resolve a sampler: None -> None; a ``Sampler`` -> itself; a ``Sampler`` subclass -> a new
    instance; a lowercase name (``"greedy"``, ``"top_k"``, ...) or a config dict -> a new instance;
    any other callable -> itself (KerasHub's rule).  Anything else raises SamplerError."""
    if identifier is None:
        return None
    if isinstance(identifier, Sampler):
        return identifier
    if isinstance(identifier, type) and issubclass(identifier, Sampler):
        return identifier()
    if isinstance(identifier, dict):
        return deserialize(identifier)
    if isinstance(identifier, str):
        if not identifier.islower() or identifier not in NAMES:
            raise SamplerError(f"unknown sampler name {identifier!r}; expected one of "
                               f"{sorted(NAMES)} (lowercase)")
        return NAMES[identifier]()
    if callable(identifier):
        return identifier
    raise SamplerError(f"could not interpret sampler identifier {identifier!r}: expected a name, "
                       "a config dict or a Sampler")
