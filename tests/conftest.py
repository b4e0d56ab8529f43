"""Shared fixtures: the shipped S&P 500 windows and a throw-away MLflow store per test module."""

from __future__ import annotations

import mlflow
import pytest

from pipeline.ingest import IngestConfig, load_prices
from pipeline.windows import WindowConfig, Windows, make_windows


@pytest.fixture(scope="session")
def gspc_windows() -> Windows:
    return make_windows(load_prices(IngestConfig(ticker="^GSPC")), WindowConfig())


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh SQLite MLflow store for the module; MLFLOW_TRACKING_URI points at it meanwhile."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        yield uri
    while mlflow.active_run():
        mlflow.end_run()
