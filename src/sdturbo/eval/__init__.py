"""`sdturbo eval`: FID and prompt alignment of teacher, ADD student and ablations on the held-out shapes prompts."""

from .cli import add_eval_arguments, format_table, run_eval
from .metrics import alignment, alignment_breakdown, fid
from .run import ROWS, Row, evaluate

__all__ = ["ROWS", "Row", "add_eval_arguments", "alignment", "alignment_breakdown", "evaluate", "fid",
           "format_table", "run_eval"]
