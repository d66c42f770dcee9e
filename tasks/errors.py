"""loraflow's errors: a small typed hierarchy, each message naming cause and fix.

Foreign exceptions (huggingface_hub, torch) are translated once, at a step boundary,
by type (see `translate_hub_error`), never by matching message text.
"""
from __future__ import annotations

from profiles.errors import LoraflowError, ProfileError  # noqa: F401 (one hierarchy)


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


class DiskFullError(LoraflowError):
    """The disk under LORAFLOW_HOME filled up during a download. Not transient: a retry
    at once would fail the same way; the user frees space and runs again."""


class OutOfMemoryError(LoraflowError):
    """Out of memory at the profile's settings; retrying the same settings won't help."""


class PublishError(LoraflowError):
    """The adapter could not be published; the trained run is kept for a re-publish."""


class VerificationError(LoraflowError):
    """The published adapter does not reproduce the local adapter's outputs."""


def transport_error_types() -> tuple[type[BaseException], ...]:
    """The exception types that mean "the connection failed", for the HTTP stack the
    installed huggingface_hub actually uses.

    huggingface_hub has moved stacks (requests in 0.x, httpx in 1.x, httpx2 in 2.x), and
    its own retry loop (`http_backoff`) retries exactly the types in
    `huggingface_hub.utils._http._DEFAULT_RETRY_ON_EXCEPTIONS`: those are taken when the
    module has them, so loraflow retries what the client itself considers transient,
    whichever version is installed (2.4 here, 1.33 on the GPU image). Otherwise the
    stack is found from `HfHubHTTPError`'s HTTP base class and its `TransportError`
    (httpx, httpx2) or `ConnectionError`/`Timeout` (requests) are used.

    Returns:
        A tuple of exception classes, always including the builtin ConnectionError and
        TimeoutError.
    """
    import importlib

    types: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
    try:
        from huggingface_hub.utils import _http

        types += tuple(getattr(_http, "_DEFAULT_RETRY_ON_EXCEPTIONS", ()))
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return types
    for base in HfHubHTTPError.__mro__[1:]:
        root = base.__module__.split(".")[0]
        if root in ("builtins", "huggingface_hub"):
            continue
        stack = importlib.import_module(root)
        for name in ("TransportError", "ConnectionError", "Timeout"):
            candidate = getattr(stack, name, None)
            if isinstance(candidate, type) and issubclass(candidate, BaseException):
                types += (candidate,)
        break
    return types


def _causes(exc: BaseException):
    """The exception and the ones it was raised from or during, outermost first."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same call can succeed (used by the task retry policy).

    A loraflow error says so itself (`transient`); a foreign one is transient when it,
    or an exception it was raised from, is a connection failure or a timeout of the
    installed Hub client's HTTP stack (`transport_error_types`). huggingface_hub wraps
    some of those (snapshot_download raises LocalEntryNotFoundError from the
    ConnectError), hence the walk down the chain.
    """
    if isinstance(exc, LoraflowError):
        return exc.transient
    transport = transport_error_types()
    return any(isinstance(e, transport) for e in _causes(exc))


def unreachable_hub_error(exc: BaseException, endpoint: str) -> "TransientHubError":
    """The one-line error for a Hub that could not be reached (after the retries).

    Args:
        exc: the transport error (or the error wrapping it).
        endpoint: the endpoint the clients used (HF_ENDPOINT).
    """
    root = next((e for e in _causes(exc) if isinstance(e, transport_error_types())), exc)
    return TransientHubError(
        f"could not reach the Hub at {endpoint} ({type(root).__name__}: {root}). Fix: check "
        "that HF_ENDPOINT names a reachable Hub (and any proxy settings), then run again: "
        "finished steps are cached.", endpoint=endpoint)


RETRY_LATER = ("run again later (finished steps are cached); if it persists, check the Hub's "
               "status or HF_ENDPOINT")


def _retryable_answer(exc: BaseException) -> str | None:
    """"503 to POST /api/…" for an HTTP answer worth retrying (408, 429, 5xx), else None."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if not (status in (408, 429) or (isinstance(status, int) and status >= 500)):
        return None
    try:
        return f"{status} to {response.request.method} {response.request.url.path}"
    except (AttributeError, RuntimeError):  # a response built without its request
        return str(status)


def translate_hub_error(exc: Exception, *, repo_id: str, repo_type: str = "model",
                        revision: str | None = None, endpoint: str = "",
                        doing: str = "", fix: str = "") -> LoraflowError:
    """Turn a huggingface_hub exception into a loraflow error, by type and status code.

    Args:
        exc: the huggingface_hub (or transport) exception.
        repo_id, repo_type, revision: the repo the call was about.
        endpoint: the Hub's URL (HF_ENDPOINT).
        doing: what the step was doing ("publishing to x/y"), for an answer worth
            retrying: after the step's retries it is the run's last line.
        fix: that answer's fix, when the step knows a better one than "run again later".
    Returns:
        A typed LoraflowError (TransientHubError for 408/429/5xx and connection failures).
    """
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
        answer = _retryable_answer(exc)
        if answer is not None:
            return TransientHubError(
                f"the Hub at {endpoint} answered {answer} while {doing or f'reading {where}'}"
                f" (retried). Fix: {fix or RETRY_LATER}.", repo_id=repo_id)
        if status in (401, 403):
            return HubAccessError(
                f"the Hub refused access to {where} (HTTP {status}). Fix: use a token "
                "(HF_TOKEN) with the needed permission.", repo_id=repo_id)
    if is_transient(exc):
        return unreachable_hub_error(exc, endpoint)
    return LoraflowError(f"unexpected error for {where}: {type(exc).__name__}: {exc}")
