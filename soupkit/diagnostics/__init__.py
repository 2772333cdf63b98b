"""Diagnostics: can these models be souped, and what did a soup do?

Weight space (streamed, numpy only), output space (exact token-level KL on probe texts), the loss
and reward along the interpolation path and over the plane of three models, and a verdict with
sourced thresholds. No typer or rich here: the CLI renders; callers may pass ``progress``.

    report(models, base=None, prompts=None, path=False, reward=None, points=9, soup=None) -> dict
    run_inspect(models, json_out=None, plots=None, force=False, **report_kw) -> dict
    verdict(report_dict) -> {"answer", "reasons", "notes"}
"""

from soupkit.diagnostics.report import report, run_inspect, write_json
from soupkit.diagnostics.verdict import verdict

__all__ = ["report", "run_inspect", "verdict", "write_json"]
