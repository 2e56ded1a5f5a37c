"""Metrics, the eval/ folder, report.html and run comparison.

    from nnforge.evaluation import classification_metrics, write_evaluation, write_report, compare_runs
"""

__all__ = ["classification_metrics", "compare_runs", "format_classification_report", "format_comparison",
           "write_evaluation", "write_report"]

_HOME = {"classification_metrics": "metrics", "format_classification_report": "metrics",
         "write_evaluation": "metrics", "write_report": "report", "compare_runs": "compare",
         "format_comparison": "compare"}


def __getattr__(name):
    # Lazy, so that a training loop importing nnforge.evaluation.metrics does not pay for matplotlib.
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(f"nnforge.evaluation.{_HOME[name]}"), name)
    raise AttributeError(f"module 'nnforge.evaluation' has no attribute '{name}'")
