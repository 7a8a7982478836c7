"""The bundled model in data/ ships inside the wheel as the package ``refopt._data`` (everything else
is configured in pyproject.toml)."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["refopt*"]) + ["refopt._data"])
