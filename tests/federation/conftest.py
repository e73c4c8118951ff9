import pytest


@pytest.fixture()
def in_a_flower_task(monkeypatch):
    """Flower stamps messages with the identity of the running task; unit tests have none, so give one."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
