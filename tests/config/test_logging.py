import logging

from django.test import Client

from config.logging import RedactTokens


def test_webhook_tokens_are_redacted_from_log_records():
    record = logging.LogRecord(
        "django.request",
        logging.WARNING,
        __file__,
        1,
        "%s: %s",
        ("Not Found", "/api/v1/integrations/s3cretTOKENvalue_-x/alertmanager/"),
        None,
    )
    assert RedactTokens().filter(record) is True
    assert record.getMessage() == "Not Found: /api/v1/integrations/<token>/alertmanager/"


def test_bearer_paths_are_left_alone():
    record = logging.LogRecord(
        "django.request",
        logging.WARNING,
        __file__,
        1,
        "Bad Request: %s",
        ("/api/v1/integrations/generic/",),
        None,
    )
    RedactTokens().filter(record)
    assert record.getMessage() == "Bad Request: /api/v1/integrations/generic/"


def test_the_console_handler_redacts_a_real_404(db, caplog):
    handler = next(h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler))
    assert any(isinstance(f, RedactTokens) for f in handler.filters)
    Client().post(
        "/api/v1/integrations/AbCdEfGhIjKlMnOpQrStUvWxYz012345/generic/",
        "{}",
        content_type="application/json",
    )
    logged = [handler.filter(r) and r.getMessage() for r in caplog.records]
    assert any("/integrations/<token>/generic/" in m for m in logged if m)
    assert not any("AbCdEfGh" in m for m in logged if m)
