"""`cli.py report`: self-contained HTML pages for a run, checked in a real headless Chromium."""

import re
import shutil

import pytest
from typer.testing import CliRunner

from analyses.html_report import write_html_report
from cli import app
from tests.helpers import load_in_chromium

needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed")


@pytest.fixture(scope="module")
def interactive_report(smoke_run, tmp_path_factory):
    return write_html_report(smoke_run, tmp_path_factory.mktemp("report"))


def test_report_pages_are_self_contained(interactive_report):
    pages = sorted(interactive_report.parent.glob("*.html"))
    assert [page.name for page in pages] == ["index.html", "round_00.html", "round_01.html"]
    for page in pages:
        text = page.read_text()
        assert not re.search(r"<script[^>]+src=", text), f"{page.name} loads an external script"
        assert "Plotly" in text
    round_page = (interactive_report.parent / "round_01.html").read_text()
    for heading in ("Data: dose and filter", "Model diffs", "Logit lens of v_r", "Greedy generations"):
        assert heading in round_page
    index = (interactive_report.parent / "index.html").read_text()
    assert 'href="round_00.html"' in index
    assert "task adherence (PMI, nats/token)" in round_page and "adherence 95% CI" in index


@needs_chromium
def test_chromium_catches_a_broken_page(tmp_path):
    """Negative control for the browser check below: a page that throws must be reported."""
    page = tmp_path / "broken.html"
    page.write_text("<html><body><p>x</p><script>throw new Error('report-test-boom')</script></body></html>")
    errors, _ = load_in_chromium(page, tmp_path / "broken.png")
    assert any("report-test-boom" in line for line in errors)


@needs_chromium
@pytest.mark.parametrize("name", ["index.html", "round_00.html"])
def test_report_renders_in_chromium(interactive_report, tmp_path, name):
    errors, dom = load_in_chromium(interactive_report.parent / name, tmp_path / "page.png")
    assert errors == []
    # plotly draws each figure into an <svg class="main-svg">: only present if the inlined JS ran.
    assert dom.count('class="main-svg"') >= 2
    blank = tmp_path / "blank.html"
    blank.write_text("<html><body></body></html>")
    load_in_chromium(blank, tmp_path / "blank.png")
    # A white page compresses to almost nothing; text, tables and plots do not.
    assert (tmp_path / "page.png").stat().st_size > 5 * (tmp_path / "blank.png").stat().st_size


@needs_chromium
def test_static_report_has_no_javascript(smoke_run, tmp_path):
    result = CliRunner().invoke(app, ["report", "--run", str(smoke_run), "--out", str(tmp_path), "--static"])
    assert result.exit_code == 0, result.output
    index = (tmp_path / "index.html").read_text()
    # Trajectory and adapter projection always; the frontier figure too once `cli.py frontier` ran on this run
    # (test_frontier does, on the shared smoke run).
    figures = 2 + (smoke_run / "analysis" / "frontier.json").is_file()
    assert "<script" not in index and index.count("data:image/png;base64,") == figures
    errors, dom = load_in_chromium(tmp_path / "round_01.html", tmp_path / "static.png")
    assert errors == [] and "Greedy generations" in dom
