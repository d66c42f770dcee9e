"""training.report_to: transformers' own integrations receive the logged metrics.

One quickstart run with `report_to: [tensorboard, mlflow]`; TensorBoard's own reader
(EventAccumulator) parses the event files kept in the run directory, MLflow's own client
reads the run from a local store, and both hold the losses the record holds. The event
files are published with the adapter under runs/.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from homes import loraflow_home  # tests/

from flows.cli import run_profile
from profiles.loader import load_profile

REPO = "loraflow-demo/report-to"
EXPERIMENT = "loraflow-report-to"


@pytest.fixture(scope="module")
def run(hub, as_user, session_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("mlflow")
    # MLflow 3 keeps its plain-file store in maintenance mode (it refuses it unless
    # MLFLOW_ALLOW_FILE_STORE is set): a local SQLite file is its local store now.
    uri = f"sqlite:///{store / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as env, loraflow_home(session_dir / "loraflow-report-to"):
        env.setenv("MLFLOW_TRACKING_URI", uri)
        env.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        with as_user("demo"):
            report = run_profile("quickstart", load_profile("quickstart", [
                f"publish.repo_id={REPO}", "training.max_steps=6", "training.logging_steps=2",
                "training.report_to=[tensorboard, mlflow]"]))
    assert report["status"] == "completed", report["error"]
    run_dir = Path(report["adapter"]["path"]).parent
    return report, run_dir, json.loads((run_dir / "record.json").read_text()), uri


def test_tensorboard_event_files_hold_the_logged_losses(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    report, run_dir, record, _ = run
    logs = run_dir / "tensorboard"
    assert list(logs.glob("events.out.tfevents.*")), list(run_dir.iterdir())
    events = EventAccumulator(str(logs))
    events.Reload()
    assert "train/loss" in events.Tags()["scalars"], events.Tags()
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == [h["step"] for h in record["loss_history"]]
    assert [e.value for e in scalars] == pytest.approx(
        [h["loss"] for h in record["loss_history"]], rel=1e-6)  # float32 in the file


def test_tensorboard_logs_are_published_under_runs(run, hub):
    from huggingface_hub import HfApi

    report, run_dir, _, _ = run
    files = HfApi(endpoint=hub.url, token=hub.token("demo")).list_repo_files(
        REPO, revision=report["hub"]["commit"])
    published = sorted(f for f in files if f.startswith("runs/"))
    local = sorted(f"runs/{p.relative_to(run_dir / 'tensorboard').as_posix()}"
                   for p in (run_dir / "tensorboard").rglob("*") if p.is_file())
    assert published == local and any("tfevents" in f for f in published), files


def test_mlflow_run_holds_the_logged_losses(run):
    from mlflow.tracking import MlflowClient

    _, _, record, uri = run
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.data.metrics for r in runs]  # the final eval in the same run
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [
        (h["step"], pytest.approx(h["loss"])) for h in record["loss_history"]]
    assert runs[0].data.metrics["eval_loss"] == pytest.approx(record["metrics"]["eval_loss"])
    assert runs[0].info.status == "FINISHED"
