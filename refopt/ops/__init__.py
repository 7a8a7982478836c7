"""The operations of OPT in NumPy, one module per family.

Each module holds the forward of an op and, beside it, its backward (``*_backward``), written so
the two can be read together, as in llm.c.  Shapes are given in comments: B batch, S query length,
T key length, D hidden width, E embedding width, H heads, K head width (D = H*K), F MLP width,
V vocabulary.
"""

# The NumPy namespace of ops: refopt.model and refopt.backward call ops through a namespace like
# this one, so a backend (refopt.kernels.cpu for Numba) can swap in kernels with the same names and
# signatures without touching the reference.
from refopt.ops.activation import relu_backward, relu_forward  # noqa: E402,F401
from refopt.ops.adam import adam_update  # noqa: E402,F401
from refopt.ops.attention import (  # noqa: E402,F401
    attention_backward, attention_forward, attention_mask, merge_heads, softmax, softmax_backward,
    split_heads)
from refopt.ops.dropout import dropout_backward, dropout_forward, dropout_mask  # noqa: E402,F401
from refopt.ops.embedding import (  # noqa: E402,F401
    embedding_backward, embedding_forward, lm_head_backward, lm_head_forward)
from refopt.ops.layernorm import layernorm_backward, layernorm_forward  # noqa: E402,F401
from refopt.ops.linear import (  # noqa: E402,F401
    linear_backward, linear_backward_input, linear_forward, linear_relu_forward)
from refopt.ops.lora import lora_backward, lora_forward, lora_merge  # noqa: E402,F401
from refopt.ops.residual import add  # noqa: E402,F401
from refopt.ops.loss import accuracy, cross_entropy_backward, cross_entropy_forward, log_softmax  # noqa: E402,F401
from refopt.ops.sampling import (  # noqa: E402,F401
    choose, descending_order, min_p_distribution, top_k_mask, top_p_distribution, uniform)
