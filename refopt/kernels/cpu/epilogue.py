"""How a product's kernels store a result (:mod:`.matmul`'s float products, :mod:`.int8`'s integer
ones): STORE (times ``alpha``), RELU, or ADD into the output."""

from numba import njit

STORE, RELU, ADD = 0, 1, 2


@njit(inline="always")
def store(out, m, j, y, mode, alpha):
    # out[m, j] <- y * alpha (STORE), max(y, 0) (RELU: NaN stays NaN, -inf gives 0, as
    # np.maximum), or out[m, j] + y (ADD)
    if mode == 0:
        out[m, j] = y * alpha
    elif mode == 1:
        out[m, j] = y if not y <= 0 else out.dtype.type(0)
    else:
        out[m, j] += y
