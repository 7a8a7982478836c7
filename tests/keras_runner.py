"""KerasHub's scripts in one long-lived subprocess per test process: TensorFlow and KerasHub take
about 5 CPU-seconds to import, more than most of the scripts take to run, and the suite runs a
dozen of them.  ``run(script, *args)`` behaves like ``subprocess.run([python, "-c", script,
*args])`` -- the script sees ``sys.argv[1:] == args``, runs as ``__main__`` in a fresh namespace,
its stdout and stderr (Python's and the C libraries') are captured -- but the interpreter, with
KerasHub imported, is kept for the next script.  Before each script ``keras.backend.clear_session()``
resets Keras's global state (layer-name counters, so a backbone is always ``opt_backbone``), so a
script computes what it would in a fresh process.  TensorFlow and torch still never share a process;
a script that needs another Keras backend (JAX, torch) runs in a subprocess of its own."""

import atexit
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

SERVER = r"""
import json, os, sys, traceback
os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
replies = os.fdopen(os.dup(1), "w")
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
import keras, keras_hub                     # once, for every script
replies.write("ready\n"); replies.flush()
for line in sys.stdin:
    request = json.loads(line)
    keras.backend.clear_session()
    saved = os.dup(1), os.dup(2)
    with open(request["stdout"], "w") as out, open(request["stderr"], "w") as err:
        os.dup2(out.fileno(), 1); os.dup2(err.fileno(), 2)
        sys.argv = ["-c", *request["argv"]]
        code = 0
        try:
            exec(compile(request["script"], "<string>", "exec"), {"__name__": "__main__"})
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc(); code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os.dup2(saved[0], 1); os.dup2(saved[1], 2)
    os.close(saved[0]); os.close(saved[1])
    replies.write(json.dumps({"returncode": code}) + "\n"); replies.flush()
"""


class _Server:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="refopt-keras-")
        self.log = open(Path(self.dir) / "server.err", "w")
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        self._read(600)                         # "ready", or the import's error

    def _read(self, timeout):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            err = (Path(self.dir) / "server.err").read_text()[-3000:]
            raise RuntimeError(f"the KerasHub process {'timed out' if not ready else 'died'}:\n{err}")
        return line

    def run(self, script, args, timeout):
        out, err = Path(self.dir) / "stdout", Path(self.dir) / "stderr"
        self.proc.stdin.write(json.dumps({"script": script, "argv": [str(a) for a in args],
                                          "stdout": str(out), "stderr": str(err)}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self._read(timeout))
        return SimpleNamespace(returncode=reply["returncode"], stdout=out.read_text(), stderr=err.read_text())

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()             # the loop ends, and the process with it
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


_server: _Server | None = None


def close():
    """End the KerasHub process (tests/conftest.py: at the end of the session)."""
    global _server
    if _server is not None:
        _server.close()
        _server = None


def run(script: str, *args, timeout: float = 600):
    """Run ``script`` (Python source that imports KerasHub with its TensorFlow backend) with
    ``args`` as its ``sys.argv[1:]`` in this process's KerasHub subprocess; returns an object with
    ``returncode``, ``stdout`` and ``stderr``, as ``subprocess.run`` would."""
    global _server
    if _server is None or _server.proc.poll() is not None:
        _server = _Server()
        atexit.register(close)
    return _server.run(script, args, timeout)
