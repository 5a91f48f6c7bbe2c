import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import override_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.django_db
def test_healthz_reports_database_and_redis_broker_ok(client, redis_url):
    with override_settings(CELERY_BROKER_URL=redis_url, CELERY_BROKER_TRANSPORT_OPTIONS={}):
        response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"database": "ok", "broker": "ok", "escalations_overdue": 0}


@pytest.mark.django_db
def test_healthz_reports_broker_down_but_stays_live(client):
    # Nothing listens on port 1: the broker is down, which delays work but loses nothing.
    with override_settings(
        CELERY_BROKER_URL="redis://127.0.0.1:1/0",
        CELERY_BROKER_TRANSPORT_OPTIONS={},
        HEALTHZ_BROKER_TIMEOUT=0.5,
    ):
        response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"database": "ok", "broker": "down", "escalations_overdue": 0}


def test_healthz_answers_503_when_the_database_is_unreachable():
    # A separate process whose DATABASE_URL points at a port where nothing listens.
    script = (
        "import django, json; django.setup();"
        "from django.test import Client;"
        "r = Client().get('/healthz');"
        "print(json.dumps({'status': r.status_code, 'body': r.json()}))"
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": "postgres://postgres@127.0.0.1:1/nothing",
        "CELERY_BROKER_URL": "redis://127.0.0.1:1/0",
        "HEALTHZ_BROKER_TIMEOUT": "0.3",
        "DJANGO_LOG_LEVEL": "CRITICAL",
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer == {"status": 503, "body": {"database": "down", "broker": "down"}}
