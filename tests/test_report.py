"""save_figure: the HTML always, the PNG when the renderer answers, and never a run stuck on a silent browser."""

import threading

import plotly.graph_objects as go

from interp_heal import report


def _figure() -> go.Figure:
    return go.Figure(go.Scatter(x=[0, 1], y=[1, 0]))


def test_a_renderer_that_never_answers_costs_the_png_not_the_run(tmp_path, monkeypatch):
    never = threading.Event()
    monkeypatch.setattr(go.Figure, "to_image", lambda self, **kwargs: never.wait() and b"")
    monkeypatch.setattr(report, "PNG_TIMEOUT_S", 0.2)
    report.save_figure(_figure(), tmp_path / "curve")
    assert (tmp_path / "curve.html").is_file() and not (tmp_path / "curve.png").exists()
    never.set()


def test_the_png_is_written_when_the_renderer_answers_and_skipped_when_it_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(go.Figure, "to_image", lambda self, **kwargs: b"\x89PNG fake")
    report.save_figure(_figure(), tmp_path / "ok")
    assert (tmp_path / "ok.png").read_bytes() == b"\x89PNG fake"

    def no_browser(self, **kwargs):
        raise RuntimeError("no Chrome found")

    monkeypatch.setattr(go.Figure, "to_image", no_browser)
    report.save_figure(_figure(), tmp_path / "failed")
    assert (tmp_path / "failed.html").is_file() and not (tmp_path / "failed.png").exists()
