"""See it learn: metric lines in the run's Prefect log, the live metrics and progress
artifacts, a loss curve the UI can render for a private repo, and a 1-step smoke run.

The flow runs in-process against localhub (flows.cli.run_profile), so Prefect's own API
holds what the UI would show: logs and artifacts are read back through its client.
"""
from __future__ import annotations

import json
import time
import zlib
from pathlib import Path

import pytest
from homes import loraflow_home  # tests/

from flows.cli import run_profile
from profiles.loader import load_profile

STEPS = 6


def _run(as_user, repo: str, *overrides: str) -> dict:
    with as_user("demo"):
        return run_profile("quickstart", load_profile(
            "quickstart", [f"publish.repo_id={repo}", *overrides]))


@pytest.fixture(scope="module", autouse=True)
def own_home(session_dir):
    with loraflow_home(session_dir / "loraflow-live-metrics") as home:
        yield home


@pytest.fixture(scope="module")
def run(hub, as_user):
    report = _run(as_user, "loraflow-demo/live-metrics", f"training.max_steps={STEPS}",
                  "training.logging_steps=2", "training.eval_steps=3")
    assert report["status"] == "completed", report["error"]
    run_dir = Path(report["adapter"]["path"]).parent
    return report, json.loads((run_dir / "record.json").read_text())


def _logs(flow_run_id: str, until) -> list[str]:
    """The flow run's log messages once `until(messages)` holds (logs reach the API
    through Prefect's log worker: flushed, then read until they are all there)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                    limit=200)
            messages = [log.message for log in logs]
            if until(messages) or time.monotonic() > deadline:
                return messages
            APILogHandler().flush()


def _artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key])))
    assert found, f"no artifact {key}"
    return max(found, key=lambda a: a.created)


def test_every_logging_step_is_one_rounded_line_in_the_run_log(run):
    report, record = run
    losses = record["loss_history"]
    assert [h["step"] for h in losses] == [1, 2, 4, 6]  # logging_first_step, then every 2
    expected = [f"step {h['step']}/{STEPS} · loss {h['loss']:.4f} · lr " for h in losses]
    messages = _logs(report["flow_run_id"],
                     lambda ms: all(any(m.startswith(e) for m in ms) for e in expected))
    for prefix in expected:
        lines = [m for m in messages if m.startswith(prefix)]
        assert len(lines) == 1, (prefix, messages)
        assert " · grad_norm " in lines[0] and "\n" not in lines[0]
        # rounded: 4 decimals for the loss, lr in e-notation with one decimal
        assert len(lines[0].split(" · loss ")[1].split(" · ")[0].split(".")[1]) == 4
        assert "e-" in lines[0].split(" · lr ")[1].split(" · ")[0]
    assert [m for m in messages if m.startswith(f"step 3/{STEPS} · eval loss ")], messages
    final = record["metrics"]["eval_loss"]  # eval_steps=3 evaluated step 6 already: once
    assert [m for m in messages if " · eval loss " in m and m.startswith(f"step {STEPS}/")] \
        == [f"step {STEPS}/{STEPS} · eval loss {final:.4f}"], messages
    assert f"step {STEPS}/{STEPS} · done · mean loss " in "\n".join(messages)


def test_live_metrics_and_progress_artifacts_hold_the_same_figures(run):
    from tasks.training.progress import metrics_key, progress_key

    report, record = run
    train_key = record["train_key"]
    metrics = _artifact(metrics_key(train_key))
    assert metrics.type == "markdown"
    assert f"step {STEPS} of {STEPS} (100%)" in metrics.data
    for h in record["loss_history"]:
        assert f"| {h['step']} | {h['loss']:.4f} |" in metrics.data, metrics.data
    assert f"{record['metrics']['eval_loss']:.4f}" in metrics.data
    progress = _artifact(progress_key(train_key))
    assert progress.type == "progress" and float(progress.data) == 100.0
    assert progress.description.startswith(f"step {STEPS}/{STEPS} · ")


def test_the_loss_curve_artifact_renders_without_the_hub(run):
    """A private repo's loss_curve.png cannot load in the UI: the artifact is markdown
    holding the data (no image, no Hub URL)."""
    from flows.artifacts import artifact_key

    report, record = run
    curve = _artifact(artifact_key(report["hub"]["repo_id"], "loss-curve"))
    assert curve.type == "markdown"
    assert "<img" not in curve.data and "/resolve/" not in curve.data
    chart = curve.data.split("```text\n")[1].split("```")[0]  # the text chart
    assert chart.count("*") >= 2 and chart.rstrip().endswith("step"), chart
    for h in record["loss_history"]:
        assert f"| {h['step']} | {h['loss']:.4f} |" in curve.data
    report_md = _artifact(artifact_key(report["hub"]["repo_id"], "report"))
    assert f"eval loss {record['metrics']['eval_loss']:.4f}." in report_md.data


def _gray_pixels(png: bytes) -> list[bytes]:
    """Rows of an 8-bit grayscale PNG written with filter 0 (as plot.py writes it)."""
    import struct

    width, height = struct.unpack(">II", png[16:24])
    idat, pos = b"", 8
    while pos < len(png):
        length = struct.unpack(">I", png[pos:pos + 4])[0]
        kind = png[pos + 4:pos + 8]
        if kind == b"IDAT":
            idat += png[pos + 8:pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    return [raw[r * (width + 1) + 1:(r + 1) * (width + 1)] for r in range(height)]


def test_the_png_has_labelled_axes():
    from tasks.publication.plot import BOTTOM, HEIGHT, LEFT, loss_curve_png

    rows = _gray_pixels(loss_curve_png([(1, 7.1), (30, 4.2), (60, 3.8)]))
    left_margin = [px for row in rows[:HEIGHT - BOTTOM] for px in row[:LEFT - 8]]
    below_axis = [px for row in rows[HEIGHT - BOTTOM + 6:] for px in row]
    assert min(left_margin) < 128, "no tick labels / axis name left of the y axis"
    assert min(below_axis) < 128, "no tick labels / axis name under the x axis"
    empty = _gray_pixels(loss_curve_png([]))
    assert min(px for row in empty[:12] for px in row[:40]) < 128  # "loss" even when empty


def test_a_one_step_smoke_run_publishes(hub, as_user, own_home):
    """training.max_steps=1: with peft's B = 0 init, lora_A gets no gradient on the first
    step (the library's own behaviour, checked here), so only the check counting that
    step right lets the run through."""
    from safetensors.torch import load_file

    report = _run(as_user, "loraflow-demo/smoke-one-step", "training.max_steps=1")
    assert report["status"] == "completed", report["error"]
    assert report["metrics"]["steps"] == 1
    run_dir = Path(report["adapter"]["path"]).parent
    before = load_file(str(run_dir / "adapter_init.safetensors"))
    after = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    import torch

    a_names = [k for k in before if ".lora_A." in k]
    b_names = [k for k in before if ".lora_B." in k]
    assert a_names and b_names
    assert all(torch.equal(before[k], after[k]) for k in a_names)  # no gradient on step 1
    assert not any(torch.equal(before[k], after[k]) for k in b_names)
    assert report["hub"]["commit"]


def test_the_learned_check_still_fails_what_did_not_move():
    import torch

    from tasks.training.adapters import unchanged_tensors

    a, b = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"
    initial = {a: torch.ones(2, 4), b: torch.zeros(4, 2)}
    moved_b = {a: torch.ones(2, 4), b: torch.full((4, 2), 0.1)}
    assert unchanged_tensors(moved_b, initial, steps=1) == []  # A exempt on step 1 only
    assert unchanged_tensors(moved_b, initial, steps=2) == [a]
    assert unchanged_tensors(initial, initial, steps=1) == [b]  # B must move on step 1
    emb_a, emb_b = "m.embed.lora_embedding_A", "m.embed.lora_embedding_B"
    emb = {emb_a: torch.zeros(2, 4), emb_b: torch.ones(4, 2)}  # embeddings: A starts at 0
    assert unchanged_tensors({emb_a: torch.ones(2, 4), emb_b: torch.ones(4, 2)}, emb,
                             steps=1) == []
