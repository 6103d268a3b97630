"""Share a trained MicroVLM on the Hub: `python -m microvlm.hub_upload --model_dir D --eval_json E --repo_id ID`.

Builds the exact folder that is uploaded — safetensors weights, config with `auto_map`, the remote-code modules,
processor and tokenizer files, the eval JSON and a model card whose YAML `model-index` is filled from the eval
JSON — then uploads it with `huggingface_hub` (token from `HF_TOKEN` or `huggingface-cli login`, never written
anywhere), private by default. `--dry-run` writes the folder only.
"""

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from .configuration_microvlm import MicroVLMConfig

logger = logging.getLogger("microvlm.hub_upload")

CARD_TEMPLATE = """---
{yaml}---

# {title}

MicroVLM is a small vision-language model with a Larimar episodic memory: a {vision} vision tower, an adapter
that pools its {patches} patch tokens into {prefix} prefix tokens, a {language} language model, a CLIP-style
alignment head, and a Gaussian episodic memory read into the language model's attention as key/value pairs.

## Quick start

```python
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

repo = "{repo_id}"
model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
image = Image.new("RGB", ({image_size}, {image_size}), "white")
inputs = processor(images=[image], text=[""], return_tensors="pt")
with torch.no_grad():
    generated = model.generate(**inputs, max_new_tokens=12, do_sample=False)
print(processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
```

## Architecture

| part | config |
|---|---|
| vision tower | `{vision}`: {image_size}² px, {patches} patches × {vision_dim} |
| adapter | Linear {vision_dim}→{hidden} → MLP {hidden}→{mlp}→{hidden} (GELU) → cross-attention pooling, {prefix} learned queries → positions → LayerNorm |
| language model | `{language}`: {layers} layers, hidden {hidden}, {heads} query heads, {kv_heads} KV heads, vocab {vocab} |
| episodic memory | {slots} slots × {hidden}; read-outs projected to per-layer key/values ({kv_heads} KV heads) and gated by ScopeNet |

Parameters: {parameters:,}.

## Training recipe

{training}

## Evaluation

Evaluated on `{dataset}` ({eval_split} split). Every figure is shown beside its baseline from the same run.

| task | metric | MicroVLM | baseline | chance |
|---|---|---|---|---|
{table}

## Intended use and limitations

A research and teaching model: small enough to train on a laptop CPU, meant for experiments on vision-language
adapters and episodic memory. It is not meant for any decision about people. {limitations}
"""


def model_index(repo_id: str, eval_results: dict[str, Any]) -> list[dict[str, Any]]:
    """The card's `model-index` entry from the eval JSON's `headline` list."""
    results = []
    for entry in eval_results["headline"]:
        results.append(
            {
                "task": {"type": "image-text-to-text", "name": entry["task"]},
                "dataset": {
                    "type": eval_results["dataset"],
                    "name": eval_results["dataset"],
                    "split": eval_results["split"],
                },
                "metrics": [{"type": entry["metric"], "name": entry["name"], "value": entry["value"]}],
            }
        )
    return [{"name": repo_id, "results": results}]


def to_yaml(value: Any, indent: int = 0) -> str:
    """A small YAML writer for the card metadata (JSON scalars are valid YAML scalars)."""
    pad = "  " * indent
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{key}:\n{to_yaml(item, indent + 1)}")
            else:
                lines.append(f"{pad}{key}: {json.dumps(item)}")
        return "\n".join(lines)
    lines = []
    for item in value:
        if isinstance(item, (dict, list)):
            body = to_yaml(item, indent + 1).lstrip()
            lines.append(f"{pad}- {body}")
        else:
            lines.append(f"{pad}- {json.dumps(item)}")
    return "\n".join(lines)


def model_card(folder: Path, repo_id: str, eval_results: dict[str, Any], license_name: str) -> str:
    config = json.loads((folder / "config.json").read_text())
    vision, text = config["vision_config"], config["text_config"]
    microvlm_config = MicroVLMConfig.from_pretrained(folder)
    patches, prefix = microvlm_config.num_patches, microvlm_config.num_image_tokens
    metadata = {
        "license": license_name,
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "tags": ["microvlm", "vision-language", "episodic-memory", "larimar", "custom_code"],
        "datasets": eval_results.get("datasets", [eval_results["dataset"]]),
        "base_model": eval_results.get("base_models", []),
        "model-index": model_index(repo_id, eval_results),
    }
    rows = [
        f"| {e['task']} | {e['name']} | {e['value']:.4g} | {e.get('baseline_name', '')} {e['baseline']:.4g} | "
        f"{e['chance']:.4g} |"
        if e.get("baseline") is not None and e.get("chance") is not None
        else f"| {e['task']} | {e['name']} | {e['value']:.4g} | – | – |"
        for e in eval_results["headline"]
    ]
    parameters = eval_results.get("parameters", 0)
    return CARD_TEMPLATE.format(
        yaml=to_yaml({k: v for k, v in metadata.items() if v}) + "\n",
        title=repo_id.split("/")[-1],
        repo_id=repo_id,
        vision=vision.get("_name_or_path") or vision["model_type"],
        language=text.get("_name_or_path") or text["model_type"],
        patches=patches,
        prefix=prefix,
        image_size=vision["image_size"],
        vision_dim=microvlm_config.vision_hidden_size,
        hidden=text["hidden_size"],
        mlp=config["adapter_mlp_ratio"] * text["hidden_size"],
        layers=text["num_hidden_layers"],
        heads=text["num_attention_heads"],
        kv_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
        vocab=text["vocab_size"],
        slots=config["memory_num_slots"],
        parameters=parameters,
        training=eval_results.get("training", "See the MicroVLM repository's README (`python -m microvlm.train`)."),
        dataset=eval_results["dataset"],
        eval_split=eval_results["split"],
        table="\n".join(rows),
        limitations=eval_results.get("limitations", ""),
    )


def build_folder(model_dir: Path, eval_json: Path, repo_id: str, output: Path, license_name: str) -> Path:
    """Write the upload folder: a copy of the saved model+processor folder, the eval JSON and the card."""
    required = [
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "configuration_microvlm.py",
        "modeling_microvlm.py",
    ]
    missing = [name for name in required if not (model_dir / name).is_file()]
    if missing:
        raise ValueError(f"{model_dir} is not a saved MicroVLM folder: missing {missing}")
    eval_results = json.loads(eval_json.read_text())
    for key in ("dataset", "split", "headline"):
        if key not in eval_results:
            raise ValueError(f"{eval_json}: expected a field {key!r} (write it with `python -m microvlm.eval`)")
    if output.exists():
        shutil.rmtree(output)
    shutil.copytree(
        model_dir,
        output,
        ignore=shutil.ignore_patterns(
            "checkpoint-*",
            "runs",
            "*.pt",
            "trainer_state.json",
            "training_args.bin",
            "optimizer*",
            "scheduler*",
            "rng_state*",
        ),
    )
    shutil.copy(eval_json, output / "eval_results.json")
    (output / "README.md").write_text(model_card(output, repo_id, eval_results, license_name))
    return output


def upload(folder: Path, repo_id: str, private: bool) -> str:
    from huggingface_hub import HfApi

    api = HfApi()  # the token comes from HF_TOKEN or the login cache; it is never written by this script
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message="Upload MicroVLM"
    )
    return str(commit)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", type=Path, required=True, help="a folder written by microvlm.train")
    parser.add_argument("--eval_json", type=Path, required=True, help="the JSON written by microvlm.eval")
    parser.add_argument("--repo_id", required=True, help="e.g. your-name/microvlm-tiny")
    parser.add_argument(
        "--output", type=Path, default=None, help="where to build the folder (default: <model_dir>-hub)"
    )
    parser.add_argument("--license", default="apache-2.0")
    parser.add_argument("--public", action="store_true", help="create a public repo (default: private)")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="build the folder only")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    output = args.output or args.model_dir.with_name(args.model_dir.name + "-hub")
    folder = build_folder(args.model_dir, args.eval_json, args.repo_id, output, args.license)
    logger.info("upload folder written: %s", folder)
    if not args.dry_run:
        logger.info(
            "uploaded to %s (%s): %s",
            args.repo_id,
            "public" if args.public else "private",
            upload(folder, args.repo_id, not args.public),
        )
    return folder


if __name__ == "__main__":
    main()
