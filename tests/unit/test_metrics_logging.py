"""MLflow beside TensorBoard: MetricsLogger's records in a local MLflow file store (no Ray)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from fmray.config import ConfigError, LoggingSection, dump_config, load_config
from fmray.train.metrics import MetricsLogger
from fmray.train.pretrain import PretrainConfig


def records(steps: range) -> list[dict]:
    return [
        {"step": s, "loss": 5.0 - s, "lr": 1e-3, "grad_norm": float("nan"), "val_loss": 4.5 - s}
        for s in steps
    ]


def test_mlflow_run_gets_the_config_and_every_record_and_continues_on_resume(tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "runs" / "pretrain-mlflow"
    run_dir.mkdir(parents=True)
    config = load_config(PretrainConfig, None, ["train.lr=0.002", "logging.mlflow=true"])
    (run_dir / "config.yaml").write_text(dump_config(config))
    logging = config.logging.model_copy(update={"progress": False, "tensorboard": False})

    logger = MetricsLogger(str(run_dir), 0, logging)
    for record in records(range(1, 4)):
        logger.log(record, max_steps=5)
    logger.close()
    # resumed from step 2: the same MLflow run, step 3 logged again, then 4 and 5
    logger = MetricsLogger(str(run_dir), 2, logging)
    for record in records(range(3, 6)):
        logger.log(record, max_steps=5)
    logger.close()

    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    client = MlflowClient((tmp_path / "runs" / "mlruns").as_uri())
    run = client.get_run(run_id)
    assert run.info.run_name == "pretrain-mlflow"
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.002"
    assert run.data.params["model.preset"] == "tiny"
    history = client.get_metric_history(run_id, "loss")
    assert sorted({(m.step, m.value) for m in history}) == [(s, 5.0 - s) for s in range(1, 6)]
    assert "grad_norm" not in run.data.metrics  # NaN is not logged
    assert run.data.metrics["val_loss"] == -0.5
    experiments = [e.name for e in client.search_experiments()]
    assert "fmray" in experiments
    # metrics.jsonl is unchanged by the second logger
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5]


def test_mlflow_without_the_package_is_a_config_error(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"logging.mlflow=true needs MLflow: pip install"):
        load_config(PretrainConfig, None, ["logging.mlflow=true"])
    assert LoggingSection().mlflow is False
