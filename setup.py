"""setuptools entry point: builds the C core (csrc/) into pyimg._core through cffi."""

from setuptools import setup

setup(cffi_modules=["pyimg/_build_ffi.py:ffibuilder"])
