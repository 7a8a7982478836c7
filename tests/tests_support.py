"""Hypothesis strategies shared by the tests."""

from hypothesis import strategies as st

from refopt.config import OPTConfig


@st.composite
def random_config(draw, dtype="float64", max_len=24):
    heads = draw(st.integers(1, 3))
    hidden = heads * draw(st.integers(1, 5))
    proj = draw(st.booleans())
    return OPTConfig(vocabulary_size=draw(st.integers(5, 40)), num_layers=draw(st.integers(1, 3)),
                     num_heads=heads, hidden_dim=hidden, intermediate_dim=draw(st.integers(1, 13)),
                     max_sequence_length=max_len, dropout=0.0, do_layer_norm_before=draw(st.booleans()),
                     word_embed_proj_dim=draw(st.integers(1, 7)) if proj else None,
                     enable_bias=draw(st.booleans()), layer_norm_elementwise_affine=draw(st.booleans()),
                     remove_final_layer_norm=draw(st.booleans()), dtype=dtype)
