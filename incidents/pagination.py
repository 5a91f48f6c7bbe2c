"""A paginator for tables that grow without bound (incidents, timeline events)."""

from __future__ import annotations

from django.core.paginator import Paginator
from django.db import connections
from django.utils.functional import cached_property

# Above this many rows an unfiltered list shows PostgreSQL's own row estimate.
ESTIMATE_ABOVE = 50_000


class EstimatedCountPaginator(Paginator):
    """Exact counts, except for an unfiltered list of a large PostgreSQL table.

    `COUNT(*)` reads every row, so on its own it makes a page slower as history grows. For
    an unfiltered queryset on PostgreSQL one query answers either way: the planner's row
    estimate (`pg_class.reltuples`, kept fresh by autovacuum) when it exceeds
    ESTIMATE_ABOVE, else the exact count. Filtered lists are always counted exactly.
    """

    @cached_property
    def count(self) -> int:
        queryset = self.object_list
        connection = connections[getattr(queryset, "db", "default")]
        if connection.vendor != "postgresql" or queryset.query.where:
            return super().count
        table = connection.ops.quote_name(queryset.model._meta.db_table)
        sql = (
            "SELECT CASE WHEN c.reltuples >= %s THEN c.reltuples::bigint "  # noqa: S608
            f"ELSE (SELECT count(*) FROM {table}) END "
            "FROM pg_class c WHERE c.oid = %s::regclass"
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, [ESTIMATE_ABOVE, queryset.model._meta.db_table])
            return int(cursor.fetchone()[0])
