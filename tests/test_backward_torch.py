"""The backward pass against PyTorch autograd through transformers' OPTForCausalLM, float64, on
random configs, weights, masks and sample weights (needs the `peers` extra)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

torch = pytest.importorskip("torch", reason="needs torch (pip install -e '.[peers]')")
transformers = pytest.importorskip("transformers", reason="needs transformers (pip install -e '.[peers]')")

from refopt.io.huggingface import grads_to_huggingface, to_state_dict  # noqa: E402
from refopt.model import init_params  # noqa: E402
from refopt.testing import strategies as rst  # noqa: E402
from refopt.training import loss_and_gradients  # noqa: E402

TOL = 1e-9  # largest absolute difference over the largest absolute gradient, per parameter


def configs():
    # the oracle's one config space (refopt.testing.cases.ConfigSpace); the final LayerNorm kept
    return rst.configs(num_heads=(1, 3), hidden=(8, 24), vocabulary_size=(20, 50), num_layers=(1, 3),
                       intermediate_dim=(4, 24), max_sequence_length=(8, 12), projection=(4, 6),
                       vary=("do_layer_norm_before", "enable_bias", "layer_norm_elementwise_affine",
                             "word_embed_proj_dim"))


def _torch_loss_and_grads(cfg, params, ids, mask, y, sw):
    hf_cfg = transformers.OPTConfig(**{k: v for k, v in cfg.to_huggingface().items()
                                       if k not in ("architectures", "model_type", "dtype")})
    model = transformers.OPTForCausalLM(hf_cfg).double().eval()
    state = {k: torch.tensor(v) for k, v in to_state_dict(params, cfg).items()}
    state["lm_head.weight"] = state["model.decoder.embed_tokens.weight"]
    model.load_state_dict(state)
    logits = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           torch.tensor(y).reshape(-1), reduction="none")
    w = torch.tensor(sw).reshape(-1)
    loss = (w * ce).sum() / w.sum()
    loss.backward()
    # the LM head is tied: named_parameters lists the shared table once, as the embedding
    return float(loss.detach()), {name: p.grad.numpy() for name, p in model.named_parameters()}


@settings(max_examples=15)
@given(cfg=configs(), seed=st.integers(0, 2**16), B=st.integers(1, 3), S=st.integers(1, 8),
       data=st.data())
def test_gradients_match_torch_autograd(cfg, seed, B, S, data):
    rng = np.random.default_rng(seed)
    params = {k: (v + rng.standard_normal(v.shape) * 0.3 if k.endswith((".gamma", ".beta", ".bias")) else v)
              for k, v in init_params(cfg, seed=seed, dtype="float64", std=0.5).items()}
    lengths = data.draw(st.lists(st.integers(1, S), min_size=B, max_size=B))
    left = data.draw(st.lists(st.booleans(), min_size=B, max_size=B))
    cols = np.arange(S)
    mask = np.stack([cols >= S - n if lp else cols < n for n, lp in zip(lengths, left)]).astype(np.int64)
    # transformers embeds with nn.Embedding(padding_idx=pad_token_id): torch gives the pad row no
    # gradient from the lookup, refopt (as Keras's Embedding) does; so the pad id appears only at
    # padding positions, as in real batches, where the two agree
    ids = rng.integers(0, cfg.vocabulary_size - 1, (B, S))
    ids = np.where(ids >= cfg.pad_token_id, ids + 1, ids)
    ids = np.where(mask.astype(bool), ids, cfg.pad_token_id)
    y = rng.integers(0, cfg.vocabulary_size, (B, S))
    # weights where the input token is real (a padding input is embedded differently by the two
    # libraries: position row 0 here, transformers' spare offset row there)
    sw = rng.random((B, S)) * mask
    sw[0, np.flatnonzero(mask[0])[-1]] = 1.0

    loss, grads = loss_and_gradients(params, cfg, {"token_ids": ids, "padding_mask": mask}, y, sw)
    t_loss, t_grads = _torch_loss_and_grads(cfg, params, ids, mask, y, sw)
    assert abs(loss - t_loss) <= 1e-12 * abs(t_loss)
    ours = grads_to_huggingface(grads, cfg)
    assert set(ours) == set(t_grads)
    largest = max(np.abs(g).max() for g in t_grads.values())
    for name, ref in t_grads.items():
        diff = np.abs(ours[name] - ref).max()
        scale = np.abs(ref).max()
        if name.endswith("k_proj.bias") or scale <= 1e-13 * largest:
            # analytically zero (k_proj.bias always; q/k when each query sees one key): both sides
            # hold round-off only
            assert np.abs(ours[name]).max() <= 1e-13 * largest, name
            continue
        assert diff <= TOL * scale, f"{name}: relative error {diff / scale:.3g}"
