"""A stand-in for huggingface_hub's `HfApi` that records what a push does (shared by the Hub tests)."""

from types import SimpleNamespace

import pytest

import viscpm.conversion.push_to_hub as hub


class FakeHfApi:
    """Records what the push does instead of talking to the Hub."""

    log: list = []

    def __init__(self, token=None, **kwargs):
        self.log.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kwargs):
        self.log.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def create_branch(self, repo_id, **kwargs):
        self.log.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for op in operations:
            with op.as_file() as handle:
                files[op.path_in_repo] = handle.read()
        self.log.append(("create_commit", {"repo_id": repo_id, "files": files, **kwargs}))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0", pr_url=None)


@pytest.fixture
def fake_api(monkeypatch):
    FakeHfApi.log = []
    monkeypatch.setattr(hub, "HfApi", FakeHfApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return FakeHfApi


def calls(api, name):
    return [data for call, data in api.log if call == name]
