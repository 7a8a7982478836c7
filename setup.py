"""The bundled model in data/ ships inside the wheel as the package ``refopt._data`` (everything else
is configured in pyproject.toml).  Its folders are listed as packages too, so setuptools installs
their files without warning that they look importable but are not declared."""

from setuptools import find_packages, setup

DATA = ["refopt._data", "refopt._data.refopt_shakespeare", "refopt._data.refopt_shakespeare.assets",
        "refopt._data.refopt_shakespeare.assets.tokenizer"]

setup(packages=find_packages(include=["refopt*"]) + DATA)
