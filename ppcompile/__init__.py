"""ppcompile: a torch.compile backend that makes the FFNs of Hugging Face transformers sparse.

    compiled = torch.compile(model, backend="prunepath", options={"tau": 0.9, "calibration": ids})
    ppcompile.report(compiled)
    ppcompile.set_tau(compiled, 0.7)
"""
from .options import OptionError, Options
from .report import Report, report, save_plan, set_tau

__all__ = ["OptionError", "Options", "Report", "report", "save_plan", "set_tau"]
