"""The product's URLs plus two baselines of the ingestion benchmark (never in product code).

- `POST /bench/noop`: reads the body and answers 200 JSON, no database: what a request
  costs the server before the tracker does any work.
- `POST /bench/store/<token>/`: the least a durable webhook can do: find the integration by
  its token's hash (one indexed SELECT), parse the JSON, store the body as one row in one
  transaction (a resolved `Alert`, so no constraint or incident is involved), answer 202.
  The floor under any design that commits a delivery before answering.
- `POST /bench/intake/<token>/`: the premise of an asynchronous intake (store the raw
  delivery, answer 202, let a worker apply it): the integration looked up by its token's
  hash once per process and kept, the JSON parsed, one INSERT through a raw cursor (no
  ORM, no explicit transaction: one autocommitted statement), 202.
"""

import hashlib
import json
import uuid

from django.db import transaction
from django.http import JsonResponse
from django.urls import include, path
from django.views.decorators.csrf import csrf_exempt

from incidents.models import Alert, AlertStatus, Integration


@csrf_exempt
def noop(request):
    return JsonResponse({"status": "ok", "bytes": len(request.body)})


@csrf_exempt
def store(request, token: str):
    digest = hashlib.sha256(token.encode()).hexdigest()
    integration_id = (
        Integration.objects.filter(token_hash=digest, is_active=True)
        .values_list("pk", flat=True)
        .first()
    )
    if integration_id is None:
        return JsonResponse({"detail": "Unknown integration key."}, status=404)
    payload = json.loads(request.body)
    with transaction.atomic():
        row = Alert.objects.create(
            integration_id=integration_id,
            fingerprint=f"store-{uuid.uuid4().hex}",
            group_key="bench-store",
            status=AlertStatus.RESOLVED,
            payload=payload,
        )
    return JsonResponse({"status": "stored", "id": row.pk}, status=202)


_INTAKE_TOKENS: dict[str, int] = {}
_INTAKE_SQL = (
    "INSERT INTO incidents_alert (integration_id, fingerprint, group_key, status, name, "
    "summary, source, severity_label, labels, annotations, payload, first_received_at, "
    "last_received_at, count) VALUES (%s, %s, 'bench-intake', 'resolved', '', '', '', '', "
    "'{}', '{}', %s, now(), now(), 1)"
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
    json.loads(body)
    with connection.cursor() as cursor:
        cursor.execute(_INTAKE_SQL, [integration_id, f"intake-{uuid.uuid4().hex}", body.decode()])
    return JsonResponse({"status": "accepted"}, status=202)


urlpatterns = [
    path("bench/intake/<str:token>/", intake, name="bench-intake"),
    path("bench/noop", noop, name="bench-noop"),
    path("bench/store/<str:token>/", store, name="bench-store"),
    path("", include("config.urls")),
]
