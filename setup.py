"""Lists ``grpo_fast.kernels``, the Triton kernels, which ``find_packages`` cannot see.

The kernels live in the top-level ``kernels/`` folder, which has no ``__init__.py`` on purpose: a regular
package named ``kernels`` at the repository root would be imported in place of the PyPI package
``kernels`` (a dependency of transformers) by anything run from the root (``python -m pytest``,
``python -m grpo_fast``, a REPL), since those put the root first on ``sys.path``. A folder without
``__init__.py`` is only a namespace portion, and Python prefers a regular package found anywhere on the
path. ``grpo_fast/kernels`` is a symbolic link to that folder, so the kernels import as the namespace
subpackage ``grpo_fast.kernels`` from a checkout or an editable install, and are copied there into a
wheel or sdist. The license is declared here too: setuptools before 77 rejects the SPDX string form of
``project.license`` and 77 and later deprecate the table form, so pyproject.toml marks it dynamic, and an
install without network on an image with an old setuptools (>= 61) works. Everything else lives in
pyproject.toml.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["grpo_fast", "grpo_fast.*"]), "grpo_fast.kernels"], license="Apache-2.0")
