"""The markers transformers' and diffusers' test files use (registered so that pytest knows them)."""

UPSTREAM_MARKERS = (
    "generate", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "torch_compile_test",
    "torch_export_test", "timeout(seconds)", "slow", "is_training_test", "is_pipeline_test", "is_tensor_parallel_test",
)


def pytest_configure(config):
    for marker in UPSTREAM_MARKERS:
        config.addinivalue_line("markers", f"{marker}: used by the upstream test mixins")
