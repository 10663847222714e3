"""Views of a run folder: heatmaps and plots, show, the HTML report, export with its model card, Hub uploads.

Its public nouns are re-exported here, imported on first use: ``from cycleqd.views import write_heatmaps``.
"""
from cycleqd.registry import lazy_exports

_EXPORTS = {
    "write_heatmaps": "cycleqd.views.plots",
    "write_history": "cycleqd.views.plots",
    "PlotObserver": "cycleqd.views.plots",
    "render_show": "cycleqd.views.show",
    "write_report": "cycleqd.views.report",
    "export": "cycleqd.views.export",
    "export_team": "cycleqd.views.export",
    "Selection": "cycleqd.views.export",
    "model_card": "cycleqd.views.card",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
