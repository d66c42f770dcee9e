"""How the sweep reads a variant run's end state (no server): the report the run
returned, the partial report a typed failure carries, or one line for a run that
crashed or whose report is out of reach; and the results table's links."""
from __future__ import annotations

from prefect.states import Completed, Crashed, Failed

from flows.finetune import FlowFailed
from flows.sweep import result_rows, rows_markdown, state_report, variant_tags
from tasks.errors import ProfileError


def test_a_completed_run_gives_its_report():
    report = {"status": "completed", "metrics": {"eval_loss": 1.5}}
    assert state_report(Completed(data=report), "r4", "id") == report


def test_a_typed_failure_gives_its_partial_report():
    partial = {"status": "failed", "error": {"type": "ProfileError"}}
    failed = FlowFailed(ProfileError("data.x: bad. Fix: y"), partial)
    assert state_report(Failed(data=failed, message="ProfileError: data.x"), "r4",
                        "id") == partial


def test_a_crash_is_one_failed_line():
    report = state_report(Crashed(message="the worker's process was killed"), "r4", "id")
    assert report["status"] == "failed" and report["metrics"] is None
    assert report["error"] == {"type": "Crashed",
                               "message": "the worker's process was killed"}


def test_rows_link_runs_and_commits():
    hub = {"repo_id": "me/a", "tag": "v1", "commit": "c" * 40, "url": "http://hub/me/a"}
    reports = {"r4": {"status": "completed", "flow_run_id": "1",
                      "run_url": "http://ui/runs/flow-run/1",
                      "metrics": {"eval_loss": 1.234567, "last_loss": 2.0},
                      "steps": {"train": {"state": "cached", "seconds": 0.5}}}}
    published = {"r4": {"hub": hub, "run_url": "http://ui/runs/flow-run/2"}}
    (row,) = result_rows({"r4": ({"lora.r": 4}, None, None)}, reports, published)
    assert row["eval_loss"] == 1.2346 and row["train"] == "cached"
    assert row["commit_url"] == f"http://hub/me/a/commit/{'c' * 40}"
    markdown = rows_markdown([row], ["lora.r"])
    assert "[run](http://ui/runs/flow-run/1)" in markdown
    assert f"](http://hub/me/a/commit/{'c' * 40})" in markdown
    assert variant_tags("S", "r4", True) == ["loraflow", "sweep:S", "variant:r4", "publish"]
