"""CUDA graphs through the driver API (``cuda.bindings``): capture the kernels a function launches on
a stream once, replay them with one launch.  Numba launches kernels on the captured stream like
on any other; nothing may allocate or synchronise during the capture."""

from __future__ import annotations


def _check(result):
    from cuda.bindings import driver

    err = result[0] if isinstance(result, tuple) else result
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA driver call failed: {err}")
    return result[1] if isinstance(result, tuple) and len(result) > 1 else None


def capture(stream, launches):
    """The instantiated graph of ``launches()`` on the numba ``stream`` (relaxed capture mode)."""
    from cuda.bindings import driver

    handle = stream.handle
    _check(driver.cuStreamBeginCapture(handle, driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED))
    try:
        launches()
    finally:
        graph = _check(driver.cuStreamEndCapture(handle))
    return _check(driver.cuGraphInstantiate(graph, 0))


def launch(graph, stream):
    """Replay an instantiated graph on ``stream``."""
    from cuda.bindings import driver

    _check(driver.cuGraphLaunch(graph, stream.handle))
