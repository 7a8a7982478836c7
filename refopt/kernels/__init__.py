"""Kernels: ``cpu`` (Numba ``@njit``) and ``cuda`` (``numba.cuda``), each an ops namespace with the
signatures of :mod:`refopt.ops`, the NumPy reference they are tested against.

Kernels are leaves: nothing here imports generation, the device decode driver, samplers, models,
training, testing or commands (``tests/test_import_rules.py``); what a kernel needs -- a sampler's
rule, a model's weights -- is passed in as arrays and numbers.
"""
