import pytest

from jaxalign.data.tokenizer import build_char_tokenizer


@pytest.fixture(scope="session")
def tok():
    return build_char_tokenizer()
