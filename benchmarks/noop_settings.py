"""Settings for the ingestion benchmark's gunicorn: the product's settings, with a URLconf
that adds one no-op endpoint (benchmarks/noop_urls.py). Product code stays free of it."""

from config.settings import *  # noqa: F403

ROOT_URLCONF = "benchmarks.noop_urls"
