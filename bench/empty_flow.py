"""The floor: an empty Prefect flow run as a new process, the way `loraflow run` runs one
(ephemeral mode unless PREFECT_API_URL points at a server). Used by cache_overhead.py."""
from prefect import flow


@flow(name="empty")
def empty() -> None:
    return None


if __name__ == "__main__":
    empty()
