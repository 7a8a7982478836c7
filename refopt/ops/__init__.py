"""The operations of OPT in NumPy, one module per family.

Each module holds the forward of an op and, beside it, its backward (``*_backward``), written so
the two can be read together, as in llm.c.  Shapes are given in comments: B batch, S query length,
T key length, D hidden width, E embedding width, H heads, K head width (D = H*K), F MLP width,
V vocabulary.
"""
