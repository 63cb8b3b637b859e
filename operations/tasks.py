"""django-q2 entry points. Each receives primary keys only and calls a service."""

from . import services
from .context import close_db_after


@close_db_after
def execute_run(run_id: int) -> str:
    return services.run_execute(run_id)


@close_db_after
def reap_stale_runs() -> list[int]:
    return services.runs_reap()
