"""Size accounting at "microvlm-v" dims with random weights (nothing is downloaded): `python -m microvlm.export
--report` writes one folder per format and prints, per component, the parameters and the bytes its tensors take in
each folder's safetensors file (read from the file's header), and each folder's total measured from its files.
"""

import json
import logging
import shutil
import struct
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from ..configuration_microvlm import MicroVLMConfig
from ..modeling_microvlm import MicroVLMForCausalLM
from .exporter import WeightFormats, folder_bytes, write_export
from .vocabulary import trim_embedding


logger = logging.getLogger(__name__)

# Components, by tensor-name prefix; the first match wins.
COMPONENTS = (
    ("vision tower", ("model.vision_tower.",)),
    ("adapter", ("model.adapter.",)),
    ("alignment", ("model.alignment.",)),
    ("memory: encoder", ("model.memory.encoder.",)),
    ("memory: prior (Larimar)", ("model.memory.larimar.",)),
    ("memory: W_M", ("model.memory.projection.",)),
    ("memory: ScopeNet", ("model.memory.scope_net.",)),
    ("reasoning head", ("reasoning_head.",)),
    # Qwen2/BitNet name the embedding embed_tokens; GPT-2 has wte (tokens) and wpe (learned positions).
    (
        "embedding / LM head",
        ("model.language_model.embed_tokens.", "model.language_model.wte.", "model.language_model.wpe.", "lm_head."),
    ),
    ("LM body", ("model.language_model.",)),
)
SEEDS_CLAIMS = 'seeds: 2172 MB (fp32) / 517 MB / 123 MB; "Qwen 1.58-bit 98.8 MB"'
TRIMMED_VOCAB = 16384


def component(name: str) -> str:
    return next((label for label, prefixes in COMPONENTS if name.startswith(prefixes)), "other")


def tensor_bytes(folder: Path) -> dict[str, int]:
    """Bytes of the tensors of each component in the folder's safetensors files, from their headers."""
    sizes: dict[str, int] = {}
    for path in folder.glob("*.safetensors"):
        with path.open("rb") as file:
            header = json.loads(file.read(struct.unpack("<Q", file.read(8))[0]))
        header.pop("__metadata__", None)
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            sizes[component(name)] = sizes.get(component(name), 0) + end - begin
    return sizes


def build(bitnet: bool) -> MicroVLMForCausalLM:
    """ "microvlm-v" with the memory on, random weights; `bitnet`: trained form of the quantized stage."""
    torch.manual_seed(0)
    config = MicroVLMConfig.from_preset("microvlm-v", use_memory=True, lm_use_bitnet=bitnet, memory_use_bitnet=bitnet)
    return MicroVLMForCausalLM(config).eval()


def trimmed(model: MicroVLMForCausalLM) -> MicroVLMForCausalLM:
    """The first `TRIMMED_VOCAB` ids plus the config's special ids: the size a trimmed vocabulary takes (Qwen's
    tokenizer cannot be fetched offline, so which tokens are kept is not measured here)."""
    text = model.config.text_config
    specials = {model.config.image_token_id, text.bos_token_id, text.eos_token_id}
    trim_embedding(model, sorted(set(range(TRIMMED_VOCAB - len(specials))) | specials))
    return model


def formats_to_report(default: WeightFormats) -> list[tuple[str, bool, Callable | None, WeightFormats | None]]:
    """(label, bitnet, model transform, formats; None = plain save_pretrained) of each reported folder."""
    fp16 = WeightFormats(lm_body="fp16", embedding="fp16", vision="fp16", rest="fp16", group_size=default.group_size)
    return [
        ("fp32 (save_pretrained)", False, None, None),
        ("fp16", False, None, fp16),
        ("ternary body, fp16 rest", True, None, replace(fp16, lm_body="ternary")),
        (f"default: ternary body, {default.embedding} embedding, {default.rest} rest", True, None, default),
        (f"default + vocabulary trimmed to {TRIMMED_VOCAB}", True, trimmed, default),
    ]


def print_size_report(output_dir: str, default: WeightFormats) -> list[dict]:
    """Write each folder of `formats_to_report` under `output_dir` (replaced), print the table, return its rows."""
    root = Path(output_dir)
    rows = []
    parameters = None
    for index, (label, bitnet, transform, formats) in enumerate(formats_to_report(default)):
        model = build(bitnet)
        if parameters is None:
            parameters = {}
            for name, parameter in model.named_parameters():  # a tied head is listed once
                parameters[component(name)] = parameters.get(component(name), 0) + parameter.numel()
        if transform is not None:
            model = transform(model)
        folder = root / f"format{index}"
        shutil.rmtree(folder, ignore_errors=True)
        if formats is None:
            model.save_pretrained(folder)
        else:
            write_export(model, None, folder, formats)
        rows.append({"label": label, "components": tensor_bytes(folder), "folder": folder_bytes(folder)})
        del model
    labels = [label for label, _ in COMPONENTS]
    lines = [
        "| component | parameters | " + " | ".join(row["label"] for row in rows) + " |",
        "|---|---:|" + "---:|" * len(rows),
    ]
    for label in labels:
        cells = [f"{row['components'].get(label, 0) / 1e6:.2f} MB" for row in rows]
        lines.append(f"| {label} | {parameters.get(label, 0) / 1e6:.2f}M | " + " | ".join(cells) + " |")
    total_parameters = sum(parameters.values())
    lines.append(
        f"| **folder, measured from its files** | {total_parameters / 1e6:.2f}M | "
        + " | ".join(f"**{row['folder'] / 1e6:.1f} MB**" for row in rows)
        + " |"
    )
    table = "\n".join(lines)
    logger.info('size report ("microvlm-v" dims, random weights; %s):\n%s', SEEDS_CLAIMS, table)
    return rows
