"""The sweep, in this process: variants as child runs of the sweep's run, tagged with
the sweep and the variant; the best one published through the fine-tuning flow's own
publish path (verify, the published event); a cached training takes no training slot.

The same sweep from its deployment, with the variants on a worker, is in
tests/integration/test_sweep_deployment.py.
"""
from __future__ import annotations

import threading
import time

from flows.sweep import (
    expand_grid,
    max_overlap,
    plan_variants,
    sweep,
    train_variant,
)
from profiles.loader import load_profile

REPO = "loraflow-demo/sweep-best"
# Values no other test trains, so every variant really trains once (no cache hits).
OVERRIDES = [f"publish.repo_id={REPO}", "training.max_steps=4", "training.logging_steps=2",
             "training.save_steps=4"]
GRID = {"lora.r": [2, 6]}


def test_grid_expands_to_every_combination():
    grid = expand_grid({"lora.r": [4, 8], "training.learning_rate": [1e-3, 2e-3]})
    assert len(grid) == 4 and {"lora.r": 8, "training.learning_rate": 2e-3} in grid


def test_overlap_counts_trainings_running_at_once():
    assert max_overlap([(0, 10), (5, 15), (12, 20), (14, 16)]) == 3
    assert max_overlap([(0, 1), (1, 2)]) == 1


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _children(sweep_run_id: str) -> list:
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    with _client() as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[sweep_run_id])))


def _task_states(flow_run_id) -> dict[str, str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client() as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs if r.state}


def _published_events(repo_id: str, timeout: float = 60) -> list:
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    from flows.ui import PUBLISHED_EVENT

    deadline = time.monotonic() + timeout
    while True:
        with _client() as client:
            events = client.read_events(EventFilter(
                event=EventNameFilter(name=[PUBLISHED_EVENT]),
                resource=EventResourceFilter(id=[f"loraflow.adapter.{repo_id}"])),
                limit=10).events
        if events or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def test_a_local_sweep_links_its_variants_and_publishes_the_best_verified(hub, as_user):
    from huggingface_hub import HfApi

    profile = load_profile("quickstart", OVERRIDES)
    with as_user("demo"):
        state = sweep(profile, GRID, publish="best", variant_deployment="local",
                      return_state=True)
    result = state.result()
    sweep_id = str(state.state_details.flow_run_id)
    rows = {r["variant"]: r for r in result["variants"]}
    assert set(rows) == {"r2", "r6"} and result["ran_on"] == "local"
    assert all(r["status"] == "completed" and r["train"] == "completed"
               for r in rows.values()), result["reports"]
    best = min(rows.values(), key=lambda r: r["eval_loss"])
    assert [r["variant"] for r in rows.values() if r["published"]] == [best["variant"]]

    # Prefect links every run to the sweep's run (its "Subflow runs"), with the tags.
    children = {r.name: r for r in _children(sweep_id)}
    publish_run = f"{best['variant']}-publish"
    assert set(children) == {"r2", "r6", publish_run}
    for name, run in children.items():
        variant = name.removesuffix("-publish")
        assert {f"sweep:{sweep_id}", f"variant:{variant}"} <= set(run.tags), run.tags
        assert run.state.is_completed()
        assert str(run.id) == result["reports"].get(name, {"flow_run_id": str(run.id)})[
            "flow_run_id"]
    assert "publish" in children[publish_run].tags

    # The best variant's publish: training cached, published and verified like a run.
    states = _task_states(children[publish_run].id)
    assert states["train"] == "Cached"
    assert states["publish"] == "Completed" and states["verify"] == "Completed", states
    api = HfApi(endpoint=hub.url, token=hub.token("demo"))
    tags = {t.name: t.target_commit for t in api.list_repo_refs(REPO).tags}
    assert best["commit"] == tags[best["tag"]]
    assert best["commit_url"].endswith(f"/commit/{best['commit']}")
    (event,) = _published_events(REPO)
    assert event.payload["commit"] == best["commit"]
    assert event.payload["profile"] == best["variant"]

    from prefect.client.schemas.filters import (
        ArtifactCollectionFilter,
        ArtifactCollectionFilterKey,
    )

    wanted = ["loraflow-sweep", "loraflow-sweep-runs"]  # by key: the suite makes hundreds
    with _client() as client:
        table = client.read_latest_artifacts(artifact_filter=ArtifactCollectionFilter(
            key=ArtifactCollectionFilterKey(any_=wanted)))
    keys = {a.key: a for a in table}
    assert "loraflow-sweep" in keys and "loraflow-sweep-runs" in keys
    assert best["commit"][:12] in keys["loraflow-sweep-runs"].data


def test_a_cached_variant_takes_no_training_slot(hub, as_user):
    """The only slot of `loraflow-training` is held elsewhere: a variant whose training
    is a cache hit (the sweep above trained it) still finishes."""
    from prefect.concurrency.sync import concurrency

    from flows.finetune import TRAINING_LIMIT
    from flows.sweep import ensure_training_limit

    (_, variant, _), = plan_variants(load_profile("quickstart", OVERRIDES),
                                     {"lora.r": [2]}, "none").values()
    ensure_training_limit(1)
    outcome = {}

    def run():
        with as_user("demo"):
            outcome["report"] = train_variant(variant, "r2")

    with concurrency(TRAINING_LIMIT, occupy=1):
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(180)
        finished_while_held = not worker.is_alive()
    worker.join(300)  # with the slot free, a waiting variant ends too
    assert finished_while_held, "the cached variant waited for a training slot"
    assert outcome["report"]["status"] == "completed"
    assert outcome["report"]["steps"]["train"]["state"] == "cached"


def test_the_cli_sweep_of_cached_variants_prints_each_one(hub, as_user, capsys):
    """`loraflow sweep` again over the variants trained above: every training cached."""
    from flows.cli import main as cli_main

    with as_user("demo"):
        code = cli_main(["sweep", "quickstart", "--grid", "lora.r=2,6", "--publish", "none",
                         "--variants-on", "local", "--set", *OVERRIDES])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = [line.split() for line in out.splitlines() if line.startswith(("r2 ", "r6 "))]
    assert [(v[0], v[1], v[2]) for v in lines] == [("r2", "completed", "cached"),
                                                    ("r6", "completed", "cached")], out
    assert "at most 0 trainings ran at once" in out
