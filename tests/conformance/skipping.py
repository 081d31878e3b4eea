"""Skipping upstream tests in a tester, each with its one-line reason (shown by `pytest -rs`)."""

import unittest


def skipped_tests(reasons: dict[str, str]) -> dict:
    """Test methods that replace upstream ones by name and skip with the given reason; use in a class body as
    ``locals().update(skipped_tests(SKIPS))``."""

    def skipping(reason):
        @unittest.skip(reason)
        def test(self):
            pass

        return test

    return {name: skipping(reason) for name, reason in reasons.items()}
