"""The sweep: 4 variants as separate flow runs under a limit of 2 trainings at once."""
from __future__ import annotations

from flows.sweep import expand_grid, max_overlap, sweep
from profiles.loader import load_profile


def test_grid_expands_to_every_combination():
    grid = expand_grid({"lora.r": [4, 8], "training.learning_rate": [1e-3, 2e-3]})
    assert len(grid) == 4 and {"lora.r": 8, "training.learning_rate": 2e-3} in grid


def test_overlap_counts_trainings_running_at_once():
    assert max_overlap([(0, 10), (5, 15), (12, 20), (14, 16)]) == 3
    assert max_overlap([(0, 1), (1, 2)]) == 1


def test_sweep_runs_four_variants_two_at_a_time_and_publishes_the_best(hub, as_user):
    from huggingface_hub import HfApi
    from prefect.client.orchestration import get_client

    repo = "loraflow-demo/sweep-best"
    # Values no other test trains, so every variant really trains (no cache hits).
    profile = load_profile("quickstart", [f"publish.repo_id={repo}", "training.max_steps=40"])
    with as_user("demo"):
        result = sweep(profile, {"lora.r": [2, 6], "training.learning_rate": [0.002, 0.004]},
                       publish="best", max_concurrent_trainings=2)
    rows = result["variants"]
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows), result["reports"]
    assert result["limit"] == 2 and result["max_concurrent_trainings"] == 2
    best = min(rows, key=lambda r: r["eval_loss"])
    assert [r["variant"] for r in rows if r["published"]] == [best["variant"]]
    assert HfApi(endpoint=hub.url, token=hub.token("demo")).list_repo_refs(repo).tags
    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
    assert any(a.key == "loraflow-sweep" for a in artifact)
