"""`loraflow.adapter.published`: once per landed commit, read back from Prefect's API.

The event belongs to the commit: a run that dies after its commit landed (simulated by
publishing the run's adapter with the publish step's own function, which emits nothing)
is announced by the re-run that heals it; a cached re-run announces nothing more; two
emitters of one commit at once leave one event. Counting waits on a sentinel event sent
last: events go out in order, so once the sentinel is stored the others are too.
"""
from __future__ import annotations

import os
import time
import uuid

import pytest

from flows.cli import run_profile
from flows.ui import PUBLISHED_EVENT, emit_published, published_event_id
from profiles.loader import load_profile

REPO = "loraflow-demo/events-healed"


@pytest.fixture(scope="module", autouse=True)
def own_home(session_dir):
    old = os.environ["LORAFLOW_HOME"]
    os.environ["LORAFLOW_HOME"] = str(session_dir / "loraflow-events")
    yield
    os.environ["LORAFLOW_HOME"] = old


def _read(filter_kwargs: dict) -> list:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter

    with get_client(sync_client=True) as client:
        return client.read_events(EventFilter(**filter_kwargs), limit=50).events


def _flush() -> None:
    """Emit a sentinel event and wait until the API has stored it."""
    from prefect.events import emit_event
    from prefect.events.filters import EventIDFilter

    sentinel = uuid.uuid4()
    emit_event(event="loraflow.test.sentinel", id=sentinel,
               resource={"prefect.resource.id": f"loraflow.test.{sentinel}"})
    deadline = time.monotonic() + 60
    while not _read({"id": EventIDFilter(id=[sentinel])}):
        assert time.monotonic() < deadline, "the sentinel event never reached the API"
        time.sleep(0.2)


def _published(repo_id: str) -> list:
    from prefect.events.filters import EventNameFilter, EventResourceFilter

    return _read({"event": EventNameFilter(name=[PUBLISHED_EVENT]),
                  "resource": EventResourceFilter(id=[f"loraflow.adapter.{repo_id}"])})


def _run(as_user, *overrides: str) -> dict:
    with as_user("demo"):
        return run_profile("quickstart", load_profile("quickstart", [
            f"publish.repo_id={REPO}", "data.eval_split=0", "training.max_steps=2",
            *overrides]))


def test_a_commit_landed_by_a_dead_run_is_announced_once_by_the_run_that_heals_it(hub,
                                                                                 as_user):
    from flows.publish import load_run
    from profiles.schema import PublishSection
    from tasks.publish import run_publish

    held = _run(as_user, "publish.when=on_approval")
    assert held["status"] == "completed", held["error"]
    # The first run "dies" right after its commit lands: the commit, no event.
    with as_user("demo"):
        landed = run_publish(load_run(held["approval"]["run_dir"]),
                             PublishSection(repo_id=REPO))
    assert landed.new_commit
    _flush()
    assert _published(REPO) == []

    healed = _run(as_user)
    assert healed["status"] == "completed", healed["error"]
    assert healed["steps"]["train"]["state"] == "cached"
    assert (healed["hub"]["commit"], healed["hub"]["new_commit"]) == (landed.commit, False)
    again = _run(as_user)  # everything cached, the same commit: nothing new to announce
    assert again["hub"]["commit"] == landed.commit
    _flush()
    events = _published(REPO)
    assert len(events) == 1, events
    assert events[0].id == published_event_id(healed["hub"])
    assert events[0].payload["commit"] == landed.commit


def test_two_emitters_of_one_commit_leave_one_event(hub):
    """Two processes that both saw the commit land (or both believe they made it) emit
    the same event id before either is stored: the API keeps one."""
    hub_record = {"repo_id": "loraflow-demo/events-raced", "commit": "c" * 40, "tag": "v1",
                  "url": f"{hub.url}/loraflow-demo/events-raced", "new_commit": True}
    first = emit_published(dict(hub_record), "0" * 64)
    second = emit_published(dict(hub_record), "0" * 64)
    assert first == second == published_event_id(hub_record)
    _flush()
    assert len(_published("loraflow-demo/events-raced")) == 1
