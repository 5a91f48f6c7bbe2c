"""Runbook steps are Markdown written by people; this renders them to HTML that is safe to
put in an admin page.

Two layers, so that neither has to be perfect: Python-Markdown runs with its raw-HTML
handling switched off (a `<script>` typed in the steps comes out as text, escaped), and
its output then goes through nh3 with a small allow-list of tags and attributes (links
keep only an http or https `href` and get `rel="noopener"`).
"""

from __future__ import annotations

import markdown as markdown_lib
import nh3
from django.utils.safestring import SafeString, mark_safe

ALLOWED_TAGS = {
    "p",
    "br",
    "hr",
    "ul",
    "ol",
    "li",
    "code",
    "pre",
    "strong",
    "em",
    "h1",
    "h2",
    "h3",
    "h4",
    "a",
    "blockquote",
    "table",
    "thead",
    "tbody",
    "tr",
    "th",
    "td",
}
# "*": nothing on other tags (nh3 would otherwise keep its default title and lang).
ALLOWED_ATTRIBUTES: dict[str, set[str]] = {"a": {"href"}, "*": set()}
URL_SCHEMES = {"http", "https"}
# Removed with their content, not unwrapped into text.
DROP_WITH_CONTENT = {"script", "style"}
EXTENSIONS = ["tables", "fenced_code", "sane_lists"]


def _markdown() -> markdown_lib.Markdown:
    md = markdown_lib.Markdown(extensions=EXTENSIONS, output_format="html")
    # Raw HTML blocks and inline tags are left as text (escaped) instead of passed through.
    md.preprocessors.deregister("html_block")
    md.inlinePatterns.deregister("html")
    return md


def render_markdown(text: str) -> SafeString:
    """Markdown to sanitised HTML. Empty text gives an empty string."""
    if not text or not text.strip():
        return mark_safe("")  # noqa: S308 - constant
    html = _markdown().convert(text)
    cleaned = nh3.clean(
        html,
        tags=ALLOWED_TAGS,
        clean_content_tags=DROP_WITH_CONTENT,
        attributes=ALLOWED_ATTRIBUTES,
        url_schemes=URL_SCHEMES,
        url_relative="deny",
        link_rel="noopener",
        strip_comments=True,
    )
    return mark_safe(cleaned)  # noqa: S308 - sanitised by nh3 with the allow-list above
