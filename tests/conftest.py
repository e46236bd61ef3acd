"""Shared fixtures: a tiny in-process model for fast tests, the real embedded model for `slow` ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_lm():
    from amygdala.engine.testing import tiny_model

    return tiny_model()


@pytest.fixture
def tmp_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("AMYGDALA_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def _tiny_model_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from amygdala.engine.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def tiny_model_dir(_tiny_model_master: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh copy per test: training, checkpoint sync and its undo log write into the model
    directory, and one test's sync must never become the next test's starting checkpoint."""
    import shutil

    return Path(shutil.copytree(_tiny_model_master, tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def embedded_config():
    """Config for slow tests: the real model cache in AMYGDALA_HOME (converted once, reused across runs)."""
    from amygdala.engine.config import Config

    return Config.load(home=os.environ.get("AMYGDALA_HOME"))


@pytest.fixture(scope="session")
def embedded_lm(embedded_config):
    from amygdala.engine.model import load_model

    return load_model(embedded_config)
