import doctest

import pytest

from jax_tw import intercept, nn, nnx, packing, patterns, prune


@pytest.mark.parametrize("module", [nn, nnx, intercept, packing, patterns, prune], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
