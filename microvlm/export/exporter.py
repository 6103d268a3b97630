"""Write a trained MicroVLM in packed form: `write_export(model, processor, output_dir, formats)`.

The folder holds `model.safetensors` (packed tensors, see `packed_weights.py`), `config.json` with `weight_formats`,
the processor and the remote code; `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` rebuilds
the packed layers from the config and loads the tensors as they are.
"""

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..modeling_microvlm import MicroVLMForCausalLM
from ..packed_weights import apply_weight_formats, check_weight_formats
from ..processing_microvlm import MicroVLMProcessor


logger = logging.getLogger(__name__)


@dataclass
class WeightFormats:
    """The form of each component's matrices (see `packed_weights.py`); the defaults are the smallest faithful
    form: a ternary LM body (exact for a model trained with `lm_use_bitnet`) and a 4-bit embedding / LM head."""

    lm_body: str = "ternary"
    embedding: str = "int4"
    vision: str = "int8"
    rest: str = "int8"
    group_size: int = 64


def write_export(
    model: MicroVLMForCausalLM,
    processor: MicroVLMProcessor | None,
    output_dir: str | os.PathLike,
    formats: WeightFormats,
) -> MicroVLMForCausalLM:
    """Pack `model` in place into `formats` and save it (with `processor`, when given) to `output_dir`.

    An LM body that was not trained ternary (`lm_use_bitnet` off) is ternarised after training when `formats`
    asks for it: the post-training baseline, logged as such. Returns the packed model.
    """
    values = asdict(formats)
    check_weight_formats(values)
    if formats.lm_body == "ternary" and not model.config.lm_use_bitnet:
        logger.warning(
            "export: the LM body was not trained ternary (lm_use_bitnet is off): post-training "
            "ternarisation without QAT, expect a loss of fidelity"
        )
        model.enable_bitnet(language_model=True)
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    values["tied_lm_head"] = tied and formats.embedding != "fp32"
    apply_weight_formats(model, values)
    model.config.weight_formats = values
    if values["tied_lm_head"]:
        model.config.tie_word_embeddings = False  # TiedLMHead reads the packed embedding instead
    model.save_pretrained(output_dir)
    if processor is not None:
        processor.save_pretrained(output_dir)
    logger.info("export: %s written to %s (%.1f MB)", values, output_dir, folder_bytes(output_dir) / 1e6)
    return model


def folder_bytes(folder: str | os.PathLike) -> int:
    """Total size of the files under `folder`, in bytes."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())
