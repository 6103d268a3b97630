"""Training tooling (not shipped with saved models): the two-stage CLI (`cli.py`, run as `python -m microvlm.train`),
the `Trainer` subclass (`trainer.py`), its callbacks (`callbacks.py`) and NF4/QLoRA loading (`quantization.py`)."""
