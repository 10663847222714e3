"""Views of a run folder: heatmaps and plots, show, the HTML report, export with its model card, Hub uploads.

Re-exported, imported on first use: ``from cycleqd.views import write_heatmaps``.
"""
from cycleqd.registry import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, plots="write_heatmaps write_history PlotObserver",
                                                show="render_show", report="write_report",
                                                export="export export_team Selection", card="model_card")
