"""Transient-error classification follows the installed Hub client's HTTP stack.

The errors come from the real huggingface_hub talking to a loopback port nothing listens
on (no mock): whichever stack the installed version uses (httpx2 in 2.x, httpx in 1.x),
a refused connection is transient and its final message names the endpoint and a fix.
"""
from __future__ import annotations

import socket

import pytest

from tasks.errors import (
    GatedRepoError,
    TransientHubError,
    is_transient,
    translate_hub_error,
    unreachable_hub_error,
)


@pytest.fixture()
def closed_endpoint() -> str:
    with socket.socket() as s:  # bound, then closed: nothing listens there now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _refused(endpoint: str) -> BaseException:
    from huggingface_hub import HfApi

    with pytest.raises(Exception) as caught:
        HfApi(endpoint=endpoint, token=False).model_info("someone/some-model")
    return caught.value


def test_a_refused_connection_is_transient_and_names_the_endpoint(closed_endpoint):
    exc = _refused(closed_endpoint)
    assert is_transient(exc)
    error = translate_hub_error(exc, repo_id="someone/some-model", endpoint=closed_endpoint)
    assert isinstance(error, TransientHubError) and error.transient
    assert closed_endpoint in error.message and "HF_ENDPOINT" in error.message
    assert "\n" not in error.message


def test_a_wrapped_connection_error_is_still_transient(closed_endpoint):
    refused = _refused(closed_endpoint)
    try:
        try:
            raise refused
        except Exception as inner:  # as snapshot_download wraps it
            raise FileNotFoundError("cannot find the requested files in the cache") from inner
    except FileNotFoundError as wrapped:
        assert is_transient(wrapped)
        assert type(refused).__name__ in unreachable_hub_error(wrapped, closed_endpoint).message


def test_bad_input_and_typed_permanent_errors_are_not_transient():
    assert not is_transient(ValueError("bad row"))
    assert not is_transient(GatedRepoError("gated"))
    assert is_transient(TransientHubError("503"))
