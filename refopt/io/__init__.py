"""Files in and out, trusting none of them.

* :mod:`refopt.io.files` -- reading: regular files only (never blocking), size caps, strict JSON.
* :mod:`refopt.io.safetensors_io` -- safetensors, validated as the specification and the official
  package do; :mod:`refopt.io.keras_h5` -- KerasHub's ``model.weights.h5``;
  :mod:`refopt.io.huggingface` -- transformers' names and position offset.
* :mod:`refopt.io.checkpoint` -- the one loader: a preset's weights validated when opened, read
  lazily by refopt name, one :class:`~refopt.io.checkpoint.Format` per layout.
* :mod:`refopt.io.presets` -- what a preset argument names (paths, built-in names, hub handles).
* :mod:`refopt.io.saving` -- writing presets without ever losing a file (staging, journal, kill-safe).
"""
