"""Export a trained MicroVLM in its 1.58-bit packed form, trim its vocabulary, and account for its size.

`python -m microvlm.export --model_dir D --output_dir O` writes the packed folder (see `exporter.py`);
`python -m microvlm.export --report` prints the per-component size table at "microvlm-v" dims (`size_report.py`).
"""

from .exporter import WeightFormats, folder_bytes, write_export


__all__ = ["WeightFormats", "folder_bytes", "write_export"]
