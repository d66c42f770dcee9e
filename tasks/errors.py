"""loraflow's errors: a small typed hierarchy, each message naming cause and fix.

Foreign exceptions (huggingface_hub, torch) are translated once, at a step boundary,
by type (see `translate_hub_error`), never by matching message text.
"""
from __future__ import annotations


class LoraflowError(Exception):
    """Base class. `transient` tells the retry policy whether trying again can help."""

    transient = False

    def __init__(self, message: str, **fields: object) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields

    def to_dict(self) -> dict:
        return {"type": type(self).__name__, "message": self.message}


class ProfileError(LoraflowError):
    """The profile is invalid: names the field, the cause and the fix."""


class HubAccessError(LoraflowError):
    """Authentication or authorization against the Hub failed."""


class MissingTokenError(HubAccessError):
    pass


class InvalidTokenError(HubAccessError):
    pass


class GatedRepoError(HubAccessError):
    pass


class RepoNotFoundError(HubAccessError):
    pass


class RevisionNotFoundError(HubAccessError):
    pass


class WritePermissionError(HubAccessError):
    pass


class TransientHubError(LoraflowError):
    """A 408/429/5xx or connection failure: worth retrying."""

    transient = True


class DownloadIntegrityError(LoraflowError):
    """A downloaded file does not match the size/hash the Hub lists for it."""

    transient = True


class DatasetError(LoraflowError):
    """The dataset cannot be read or does not fit the chosen format."""


class TrainingError(LoraflowError):
    """Training could not run (e.g. target modules match nothing, no learning)."""


class SettingsError(LoraflowError):
    """A LORAFLOW_* environment setting is invalid: names the variable, cause and fix."""


class TrainingInterrupted(LoraflowError):
    """Training stopped on SIGTERM/SIGINT (e.g. a cancel from the Prefect UI) after saving a
    checkpoint. Not retried in-process (the stop was asked for); a re-run resumes."""


class DistributedTrainingError(LoraflowError):
    """A torchrun training process died or a collective failed (NCCL/Gloo timeout, a
    killed rank). Transient: the retry resumes from the last checkpoint."""

    transient = True


class OutOfMemoryError(LoraflowError):
    """Out of memory at the profile's settings; retrying the same settings won't help."""


class PublishError(LoraflowError):
    """The adapter could not be published; the trained run is kept for a re-publish."""


class VerificationError(LoraflowError):
    """The published adapter does not reproduce the local adapter's outputs."""


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same call can succeed (used by the task retry policy)."""
    if isinstance(exc, LoraflowError):
        return exc.transient
    transient_types: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
    try:
        import httpx

        transient_types += (httpx.TransportError,)
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, transient_types)


def translate_hub_error(exc: Exception, *, repo_id: str, repo_type: str = "model",
                        revision: str | None = None, endpoint: str = "") -> LoraflowError:
    """Turn a huggingface_hub exception into a loraflow error, by type and status code."""
    from huggingface_hub import errors as hf

    where = f"{repo_type} '{repo_id}'"
    page = f"{endpoint}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
    if isinstance(exc, hf.GatedRepoError):
        return GatedRepoError(
            f"{where} is gated and this token has no access to it. Fix: open {page} while "
            "logged in as the token's user, request access, and re-run once it is granted "
            "(or use a token of a user who has access).", repo_id=repo_id)
    if isinstance(exc, hf.RevisionNotFoundError):
        return RevisionNotFoundError(
            f"revision '{revision}' does not exist in {where}. Fix: set a branch, tag or "
            "commit sha that exists (model.revision / data.revision).", repo_id=repo_id)
    if isinstance(exc, hf.RepositoryNotFoundError):
        return RepoNotFoundError(
            f"{where} was not found at {endpoint}, or it is private and this token cannot "
            "read it. Fix: check the id (model.id / data.dataset) and that HF_TOKEN belongs "
            "to a user with access.", repo_id=repo_id)
    if isinstance(exc, hf.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (408, 429) or (status is not None and status >= 500):
            return TransientHubError(f"the Hub answered {status} for {where}; retrying may help.",
                                     repo_id=repo_id)
        if status in (401, 403):
            return HubAccessError(
                f"the Hub refused access to {where} (HTTP {status}). Fix: use a token "
                "(HF_TOKEN) with the needed permission.", repo_id=repo_id)
    if is_transient(exc):
        return TransientHubError(f"connection to the Hub failed for {where} "
                                 f"({type(exc).__name__}); retrying may help.", repo_id=repo_id)
    return LoraflowError(f"unexpected error for {where}: {type(exc).__name__}: {exc}")
