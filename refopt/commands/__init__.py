"""Subcommands of the ``refopt`` command (see :mod:`refopt.cli`)."""


def warn_if_simulated(command: str, backend: str | None) -> None:
    """Say on stderr when the backend a command resolves to is Numba's CUDA simulator
    (``NUMBA_ENABLE_CUDASIM=1``): it runs each GPU thread in Python, to test the kernels on small
    shapes, and takes minutes per token on the bundled model."""
    import os
    import sys

    from refopt import backend as _backend

    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0") and _backend.resolve(backend) == "cuda":
        print(f"refopt {command}: the cuda backend is Numba's CUDA simulator here "
              "(NUMBA_ENABLE_CUDASIM=1), which exists to test the GPU kernels on tiny shapes: expect "
              "minutes per token on a real model; unset NUMBA_ENABLE_CUDASIM or use --backend numba",
              file=sys.stderr, flush=True)


def announce_slow_compiles(write, after: float = 1.0) -> None:
    """From now on, when a Numba compilation on the main thread has run for ``after`` seconds,
    say so once with ``write(message)`` (the command line's promise: no silent wait longer than a
    second).  Background warm-ups (:func:`refopt.generation.prepare`) compile silently: nobody
    waits for them."""
    import threading

    try:
        from numba.core import event
    except ImportError:
        return

    class Listener(event.Listener):
        depth = 0
        timer = None
        said = False

        def on_start(self, ev):
            if threading.current_thread() is not threading.main_thread():
                return
            self.depth += 1
            if self.depth == 1 and not self.said:
                self.timer = threading.Timer(after, self.say)
                self.timer.daemon = True
                self.timer.start()

        def on_end(self, ev):
            if threading.current_thread() is not threading.main_thread():
                return
            self.depth -= 1
            if self.depth == 0 and self.timer is not None:
                self.timer.cancel()
                self.timer = None

        def say(self):
            if not self.said:
                self.said = True
                write("refopt: compiling Numba kernels (once; Numba caches them for later runs) ...")

    event.register("numba:compile", Listener())
