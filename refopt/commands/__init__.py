"""Subcommands of the ``refopt`` command (see :mod:`refopt.cli`)."""
