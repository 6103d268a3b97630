"""Evaluation tooling (not shipped with saved models): the evaluation CLI with its table of conditions (`cli.py`,
run as `python -m microvlm.eval`), its typed results (`results.py`), embedding and attention statistics
(`analysis.py`), figures (`visualisation.py`), the Markdown report (`report.py`) and the local `evaluate` metric
scripts (`metrics/`)."""
