"""Fixtures several test files share."""

import pytest

import evit_patch.train.loop as loop


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a dataset or a model is built."""
    def forbidden(*args, **kwargs):
        pytest.fail("data or a model was built for an input that should have been refused first")

    monkeypatch.setattr(loop, "build_dataset", forbidden)
    monkeypatch.setattr(loop, "prepare_model", forbidden)
