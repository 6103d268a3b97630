"""NF4 4-bit frozen backbones (bitsandbytes) and QLoRA on the language model.

bitsandbytes is optional at run time: where it cannot be imported, or the device is neither CPU nor CUDA, the
model loads in full precision after one warning (the documented fallback); nothing else changes.
"""

import logging

import torch

from ..bitnet import LANGUAGE_MODEL_PROJECTIONS as LORA_TARGETS


logger = logging.getLogger(__name__)

# MicroVLM's own trainable parts stay in full precision; only the vision tower and the LM body are quantised.
SKIP_MODULES = ["model.adapter", "model.alignment", "model.memory", "lm_head"]


def nf4_quantization_config(device: torch.device | str):
    """`BitsAndBytesConfig` for NF4 with double quantisation: fp32 compute on CPU, bf16 on CUDA.

    Returns None (after one warning) when bitsandbytes is missing or the device type is unsupported.
    """
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        logger.warning(
            "4-bit loading skipped: bitsandbytes supports cpu and cuda, not %s; loading full precision", device.type
        )
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        logger.warning("4-bit loading skipped: bitsandbytes is not importable (%s); loading full precision", error)
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        llm_int8_skip_modules=SKIP_MODULES,
    )


def add_qlora(
    model, rank: int = 16, alpha: int = 32, dropout: float = 0.05, trainable_modules: list[str] | None = None
):
    """QLoRA: `prepare_model_for_kbit_training`, then LoRA on the LM's seven projections (not the vision tower).

    `trainable_modules` (e.g. ["adapter", "alignment"]) stay fully trainable beside the LoRA weights. Gradient
    checkpointing is left off: it would drop the memory's past_key_values.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = rf"model\.language_model\..*\.({'|'.join(LORA_TARGETS)})"
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, modules_to_save=trainable_modules
    )
    return get_peft_model(model, config)
