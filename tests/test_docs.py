"""The core's docstring examples run as written."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import braintrace

MODULES = sorted(info.name for info in pkgutil.walk_packages(braintrace.__path__, "braintrace."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} failing example(s) in {name}"
