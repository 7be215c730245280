"""Installs the top-level ``kernels/`` folder as the subpackage ``grpo_fast.kernels``.

A top-level package named ``kernels`` would clash with the PyPI package of that name, and
pyproject.toml alone cannot map one folder under another package's name. Every other subpackage of
``grpo_fast`` is found automatically; everything else lives in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["grpo_fast", "grpo_fast.*"]), "grpo_fast.kernels"],
    package_dir={"grpo_fast.kernels": "kernels"},
)
