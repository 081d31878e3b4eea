"""pytest set-up for the upstream test mixins: their markers are registered, and the warnings they check for (e.g.
the deprecation of ``past_key_values``) are recorded here although the project's pytest.ini ignores
FutureWarning and DeprecationWarning elsewhere."""

from pathlib import Path

import pytest

UPSTREAM_MARKERS = (
    "generate", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "torch_compile_test",
    "torch_export_test", "timeout(seconds)", "slow", "is_training_test", "is_pipeline_test", "is_tensor_parallel_test",
)
HERE = Path(__file__).resolve().parent


def pytest_configure(config):
    for marker in UPSTREAM_MARKERS:
        config.addinivalue_line("markers", f"{marker}: used by the upstream test mixins")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.filterwarnings("default::FutureWarning"))
            item.add_marker(pytest.mark.filterwarnings("default::DeprecationWarning"))
