"""Runbook steps are rendered from Markdown into admin pages: formatting survives, active
content does not."""

import pytest

from incidents.markdown import render_markdown


def test_markdown_formatting_survives():
    html = render_markdown(
        "# Backend down\n\n1. Check **health**\n2. Run `docker compose ps`\n\n"
        "> Escalate after 30 min\n\n| step | who |\n|---|---|\n| restart | on call |\n\n"
        "```\ncurl -f http://localhost:3000/health\n```"
    )
    for fragment in (
        "<h1>Backend down</h1>",
        "<ol>",
        "<li>Check <strong>health</strong></li>",
        "<code>docker compose ps</code>",
        "<blockquote>",
        "<table>",
        "<th>step</th>",
        "<td>restart</td>",
        "<pre><code>curl -f http://localhost:3000/health",
    ):
        assert fragment in html


def test_http_links_are_kept_with_noopener():
    html = render_markdown("[status](https://status.example.com/a?b=1) and <http://x.example>")
    assert '<a href="https://status.example.com/a?b=1" rel="noopener">status</a>' in html
    assert '<a href="http://x.example" rel="noopener">' in html


@pytest.mark.parametrize(
    "text",
    [
        "<script>alert(1)</script>",
        "Step one <script>alert(1)</script> done",
        "<img src=x onerror=alert(1)>",
        "1. <b onmouseover=alert(1)>hover</b>",
        '<a href="javascript:alert(1)">click</a>',
        "<iframe src=https://evil.example></iframe>",
        "<style>body{display:none}</style>",
        "<div>\n<script>alert(1)</script>\n</div>",
        "<!-- <script>alert(1)</script> -->",
    ],
)
def test_raw_html_is_shown_as_text_never_as_markup(text):
    html = render_markdown(text)
    for tag in ("<script", "<img", "<b ", "<a ", "<iframe", "<style", "<div", "<!--"):
        assert tag not in html
    # The words are still readable, as escaped text.
    assert "&lt;" in html


@pytest.mark.parametrize(
    "link",
    [
        "javascript:alert(1)",
        "JaVaScRiPt:alert(1)",
        "<javascript:alert(1)>",
        "data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==",
        "vbscript:msgbox(1)",
        "/admin/auth/user/",
    ],
)
def test_links_other_than_http_lose_their_target(link):
    html = render_markdown(f"[click]({link})")
    assert "href" not in html
    assert "javascript" not in html.lower()
    assert "click" in html


def test_markdown_images_and_attributes_are_dropped():
    html = render_markdown('![x](https://tracker.example/pixel.png "t")\n\n[a](https://e.x "t")')
    assert "<img" not in html
    assert "title=" not in html


def test_empty_steps_render_nothing():
    assert render_markdown("") == ""
    assert render_markdown("   \n") == ""
