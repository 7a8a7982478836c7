"""Token and position embeddings (a gather), and the tied LM head (a product with the same table)."""

import numpy as np


def embedding_forward(table, ids):
    # table [V, E], ids [B, S] int -> [B, S, E]
    return table[ids]


def lm_head_forward(x, table):
    # x [B, S, E], table [V, E] -> logits [B, S, V]; the head is the token table transposed (tied).
    return x @ table.T
