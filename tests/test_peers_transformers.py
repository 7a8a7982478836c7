"""Live conformance with transformers' OPTForCausalLM on random configs (needs the `peers` extra)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

torch = pytest.importorskip("torch", reason="needs torch (pip install -e '.[peers]')")
transformers = pytest.importorskip("transformers", reason="needs transformers (pip install -e '.[peers]')")

from refopt.models import OPTBackbone, OPTCausalLM  # noqa: E402
from refopt.testing import strategies as rst  # noqa: E402


def configs():
    # the oracle's one config space (refopt.testing.cases.ConfigSpace); the final LayerNorm kept
    return rst.configs(num_heads=(1, 4), head_dim=(1, 6), vocabulary_size=(8, 60), num_layers=(1, 3),
                       intermediate_dim=(1, 17), max_sequence_length=(12, 20), projection=(1, 9),
                       vary=("do_layer_norm_before", "enable_bias", "layer_norm_elementwise_affine",
                             "word_embed_proj_dim"))


def _masks(data, B, T):
    lengths = data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    cols = np.arange(T)
    right = np.stack([cols < n for n in lengths]).astype(np.int64)
    left = np.stack([cols >= T - n for n in lengths]).astype(np.int64)
    return right, left


def _hf_logits(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return out.logits.double().numpy()


def _random_hf_model(cfg, seed):
    torch.manual_seed(seed)
    hf_cfg = transformers.OPTConfig(**{k: v for k, v in cfg.to_huggingface().items()
                                       if k not in ("architectures", "model_type", "dtype")},
                                    init_std=0.3)
    # transformers' default attention ("sdpa"), as the fixtures used: its "eager" path turns a
    # fully masked row (left padding) into NaN, which then leaks into later layers' real positions.
    model = transformers.OPTForCausalLM(hf_cfg).double().eval()
    with torch.no_grad():  # LayerNorm gains/biases away from 1/0 so their handling is exercised
        for name, p in model.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return model


@settings(max_examples=25)
@given(cfg=configs(), data=st.data())
def test_transformers_checkpoint_logits(tmp_path_factory, cfg, data):
    seed = data.draw(st.integers(0, 2**16))
    model = _random_hf_model(cfg, seed)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    lm = OPTCausalLM.from_preset(path, dtype="float64")
    assert lm.backbone.config == cfg
    B, T = data.draw(st.integers(1, 3)), data.draw(st.integers(1, cfg.max_sequence_length))
    ids = np.random.default_rng(seed).integers(0, cfg.vocabulary_size, (B, T))
    for mask in _masks(data, B, T):
        ours = lm.predict({"token_ids": ids, "padding_mask": mask})
        theirs = _hf_logits(model, ids, mask)
        real = mask.astype(bool)
        err = np.abs(ours - theirs)[real].max()
        assert err <= 1e-9, f"max |Δlogit| {err:.3g} for {cfg}"


@settings(max_examples=10)
@given(cfg=configs(), data=st.data())
def test_transformers_loads_what_refopt_writes(tmp_path_factory, cfg, data):
    seed = data.draw(st.integers(0, 2**16))
    bb = OPTBackbone.from_opt_config(cfg)
    bb.params = {k: np.random.default_rng(seed + i).standard_normal(v.shape) * 0.3
                 for i, (k, v) in enumerate(bb.params.items())}
    lm = OPTCausalLM(bb)
    path = tmp_path_factory.mktemp("out")
    lm.save_to_preset(path / "p", format="huggingface")
    model = transformers.OPTForCausalLM.from_pretrained(path / "p", dtype=torch.float64).eval()
    B, T = 2, data.draw(st.integers(1, cfg.max_sequence_length))
    ids = np.random.default_rng(seed).integers(0, cfg.vocabulary_size, (B, T))
    for mask in _masks(data, B, T):
        real = mask.astype(bool)
        err = np.abs(lm.predict({"token_ids": ids, "padding_mask": mask}) - _hf_logits(model, ids, mask))[real].max()
        assert err <= 1e-9
