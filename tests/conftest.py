import pytest


@pytest.fixture(scope="session")
def vocab_file():
    """The CPM-Bee vocabulary, taken from the installed original package (never stored in this repo)."""
    from oracle import VOCAB_FILE

    return VOCAB_FILE
