"""`python -m microvlm.train ...`: see `microvlm/train/cli.py`."""

from .cli import main


main()
