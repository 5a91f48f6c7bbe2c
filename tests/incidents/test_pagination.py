import pytest
from django.db import connection

from incidents import pagination
from incidents.models import Incident
from incidents.pagination import EstimatedCountPaginator

from .factories import declare

pytestmark = pytest.mark.django_db


def analyze() -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {Incident._meta.db_table}")


def test_small_unfiltered_tables_are_counted_exactly():
    for _ in range(3):
        declare()
    assert EstimatedCountPaginator(Incident.objects.all(), 50).count == 3


def test_large_unfiltered_table_uses_the_planner_estimate_in_one_query(
    monkeypatch, django_assert_num_queries
):
    if connection.vendor != "postgresql":
        pytest.fail("this behaviour is PostgreSQL's; run the suite against PostgreSQL")
    monkeypatch.setattr(pagination, "ESTIMATE_ABOVE", 5)
    for _ in range(8):
        declare()
    analyze()
    for _ in range(4):
        declare()  # not yet seen by ANALYZE: the estimate lags, the exact count does not
    with django_assert_num_queries(1):
        estimated = EstimatedCountPaginator(Incident.objects.all(), 50).count
    assert estimated == 8
    filtered = Incident.objects.filter(status="triggered")
    assert EstimatedCountPaginator(filtered, 50).count == 12
