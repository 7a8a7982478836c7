"""Token and position embeddings (a gather), and the tied LM head (a product with the same table)."""

import numpy as np


def embedding_forward(table, ids):
    # table [V, E], ids [B, S] int -> [B, S, E]
    return table[ids]


def lm_head_forward(x, table):
    # x [B, S, E], table [V, E] -> logits [B, S, V]; the head is the token table transposed (tied).
    return x @ table.T


def embedding_backward(d_out, ids, num_rows):
    # d_out [B, S, E], ids [B, S] int -> d_table [num_rows, E]: each row sums the gradients of the
    # positions that gathered it (rows never gathered get zero)
    E = d_out.shape[-1]
    d_table = np.zeros((num_rows, E), d_out.dtype)                       # [V, E]
    np.add.at(d_table, np.asarray(ids).reshape(-1), d_out.reshape(-1, E))
    return d_table


def lm_head_backward(d_logits, x, table):
    # d_logits [B, S, V], x [B, S, E], table [V, E] -> d_x [B, S, E], d_table [V, E] (the head's share
    # of the tied table's gradient; the caller adds the embedding's share)
    V, E = table.shape
    d_x = d_logits @ table                                                # [B, S, E]
    d_table = d_logits.reshape(-1, V).T @ x.reshape(-1, E)                # [V, E]
    return d_x, d_table
