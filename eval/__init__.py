"""Evaluation: sampling and grading (eval.math), metrics (eval.metrics), result tables (eval.table),
and the lm-evaluation-harness recipe for IFEval / GPQA-Diamond (eval/harness.sh)."""
