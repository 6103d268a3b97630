"""`python -m microvlm.eval --model_dir D ...`: see `microvlm/eval/cli.py`."""

from .cli import main


main()
