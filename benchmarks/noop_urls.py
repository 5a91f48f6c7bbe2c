"""The product's URLs plus two baselines of the ingestion benchmark (never in product code).

- `POST /bench/noop`: reads the body and answers 200 JSON, no database: what a request
  costs the server before the tracker does any work.
- `POST /bench/intake/<token>/`: the least an asynchronous webhook can do before it answers:
  the integration looked up by its token's hash once per process and kept, the JSON parsed,
  the body stored with one INSERT through a raw cursor (no ORM, no explicit transaction: one
  autocommitted statement) into the same delivery table the real webhook writes to, marked
  done so that the worker leaves it alone, 202.
"""

import hashlib
import json

from django.http import JsonResponse
from django.urls import include, path
from django.views.decorators.csrf import csrf_exempt

from incidents.models import Integration


@csrf_exempt
def noop(request):
    return JsonResponse({"status": "ok", "bytes": len(request.body)})


_INTAKE_TOKENS: dict[str, int] = {}
_INTAKE_SQL = (
    "INSERT INTO incidents_alertdelivery (integration_id, received_at, body, status, attempts, "
    "error, applied_at, alerts, incidents) VALUES (%s, now(), %s, 'done', 0, '', now(), %s, "
    "'[]') RETURNING id"
)


@csrf_exempt
def intake(request, token: str):
    from django.db import connection

    digest = hashlib.sha256(token.encode()).hexdigest()
    integration_id = _INTAKE_TOKENS.get(digest)
    if integration_id is None:
        integration_id = (
            Integration.objects.filter(token_hash=digest, is_active=True)
            .values_list("pk", flat=True)
            .first()
        )
        if integration_id is None:
            return JsonResponse({"detail": "Unknown integration key."}, status=404)
        _INTAKE_TOKENS[digest] = integration_id
    body = request.body
    alerts = len(json.loads(body).get("alerts") or [])
    with connection.cursor() as cursor:
        cursor.execute(_INTAKE_SQL, [integration_id, body.decode(), alerts])
        delivery = cursor.fetchone()[0]
    return JsonResponse({"status": "accepted", "delivery": delivery, "alerts": alerts}, status=202)


urlpatterns = [
    path("bench/intake/<str:token>/", intake, name="bench-intake"),
    path("bench/noop", noop, name="bench-noop"),
    path("", include("config.urls")),
]
