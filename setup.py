"""Package discovery; all other metadata lives in pyproject.toml.

``kernels/`` at the top of the repository is installed as ``fastppo.kernels``, never as a top-level
``kernels`` package: Hugging Face ships a PyPI package named ``kernels`` that transformers probes for.
``[tool.setuptools.packages.find]`` cannot map a folder to another package name, so every package,
present and future (``fastppo.trainer`` ...), is found here.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["fastppo", "fastppo.*"])
packages += ["fastppo.kernels"] + [f"fastppo.kernels.{p}" for p in find_packages("kernels")]

setup(packages=packages, package_dir={"fastppo": "fastppo", "fastppo.kernels": "kernels"})
