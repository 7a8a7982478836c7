"""Files in and out, trusting none of them.

* :mod:`refopt.io.files` -- reading: regular files only (never blocking), size caps, strict JSON.
* :mod:`refopt.io.safetensors_io` -- safetensors, validated as the specification and the official
  package do; :mod:`refopt.io.keras_h5` -- KerasHub's ``model.weights.h5``;
  :mod:`refopt.io.huggingface` -- transformers' names and position offset.
* :mod:`refopt.io.checkpoint` -- the one loader: a preset's weights validated when opened, read
  lazily by refopt name, one :class:`~refopt.io.checkpoint.Format` per layout, over the tensor
  sources of :mod:`refopt.io.sources` (one per weight-file kind; the pickle-free PyTorch, TF and
  Flax readers are :mod:`~refopt.io.torch_pickle`, :mod:`~refopt.io.tf_keras_h5`,
  :mod:`~refopt.io.flax_msgpack`).
* :mod:`refopt.io.presets` -- what a preset argument names (paths, built-in names, hub handles),
  its validated ``config.json``.
* :mod:`refopt.io.saving` -- writing presets without ever losing a file (:class:`PresetSave`);
  :mod:`refopt.io.preset_layout` says what a preset consists of and where a save may write,
  :mod:`refopt.io.journal` holds the file-system calls, the commit journal and recovery.

Imports run one way: ``checkpoint -> sources -> readers, huggingface, files``; ``saving ->
journal -> preset_layout``; ``presets`` reads configs and never opens weights.
"""
