"""The one place that builds a Hub client: endpoint and token from the environment.

Tasks call `hub_api()` inside their bodies; the token is never a task parameter, so
it never reaches Prefect's parameters, cache keys, results or logs.
"""
from __future__ import annotations

from tasks import settings


def hub_api():
    """An HfApi bound to HF_ENDPOINT and HF_TOKEN."""
    settings.prepare_client_environment()
    from huggingface_hub import HfApi

    return HfApi(endpoint=settings.hub_endpoint(), token=settings.hub_token())


def repo_url(repo_id: str, repo_type: str = "model") -> str:
    prefix = "datasets/" if repo_type == "dataset" else ""
    return f"{settings.hub_endpoint()}/{prefix}{repo_id}"
