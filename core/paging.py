"""A changelist paginator that does not count 500,000 rows to print "500,000 backups".

Django's admin counts the filtered rows for its paginator (and, unless show_full_result_count is False, all rows
once more). On PostgreSQL a COUNT(*) reads every matching row; here the count is exact up to EXACT_UP_TO rows
(counted over at most that many plus one) and above that it is the planner's estimate, shown as such by the
numbers alone (pages past the real end come back empty, never an error page).
"""

from __future__ import annotations

import json

from django.core.paginator import Paginator
from django.db import connections
from django.utils.functional import cached_property

EXACT_UP_TO = 10_000


def planner_rows(queryset) -> int:
    """PostgreSQL's estimate of the rows `queryset` returns (EXPLAIN, nothing is executed)."""
    plan = json.loads(queryset.order_by().explain(format="json"))
    return int(plan[0]["Plan"]["Plan Rows"])


class EstimatedCountPaginator(Paginator):
    @cached_property
    def count(self) -> int:
        qs = self.object_list
        if connections[qs.db].vendor != "postgresql":
            return super().count
        bounded = qs.order_by()[:EXACT_UP_TO + 1].count()  # reads at most EXACT_UP_TO + 1 rows
        if bounded <= EXACT_UP_TO:
            return bounded
        return max(planner_rows(qs), bounded)

