import pytest

from customers.services import customer_check_start
from tests.conftest import wait_for_run

pytestmark = [pytest.mark.smoke, pytest.mark.django_db(transaction=True)]


def test_check_runs_on_a_real_worker_and_records_each_step(make_customer, worker):
    customer = make_customer(services=("backend", "store"))
    run = customer_check_start(customer, via="cli")
    run = wait_for_run(run.pk)
    assert run.status == "succeeded", (run.error, worker.output()[-3000:])
    texts = list(run.log_lines.values_list("text", flat=True))
    assert any("service backend: folder" in t for t in texts)
    assert run.result["ok"] is True
    assert run.progress_done == run.progress_total == 3
