"""Adapters for the two established OPT implementations, imported only when used:

* :class:`refopt.testing.adapters.transformers.TransformersAdapter` -- Hugging Face transformers
  (PyTorch), in process; needs ``torch`` and ``transformers`` (``pip install refopt[peers]``);
* :class:`refopt.testing.adapters.keras_hub.KerasHubAdapter` -- KerasHub with its TensorFlow backend,
  in a subprocess (TensorFlow and PyTorch never share a process); needs ``keras-hub`` and
  ``tensorflow`` (``pip install refopt[keras]``) in ``sys.executable`` or in the interpreter named by
  ``REFOPT_KERAS_PYTHON``.
"""
