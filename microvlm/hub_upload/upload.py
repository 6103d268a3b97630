"""Share a trained MicroVLM on the Hub: `python -m microvlm.hub_upload --model_dir D --eval_json E --repo_id ID`.

Builds the exact folder that is uploaded — safetensors weights, config with `auto_map`, the remote-code modules,
processor and tokenizer files, the eval JSON and a model card (`huggingface_hub.ModelCard`, its `model-index`
filled from the eval JSON) — then uploads it with `huggingface_hub` (token from `HF_TOKEN` or `huggingface-cli login`, never written
anywhere), private by default. `--dry-run` writes the folder only.
"""

import argparse
import logging
import shutil
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..configuration_microvlm import MicroVLMConfig
from ..eval.results import EvalResults
from ..modeling_microvlm import MicroVLMForCausalLM


logger = logging.getLogger("microvlm.hub_upload")

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

MicroVLM is a small vision-language model with a Larimar episodic memory: a {{ vision }} vision tower, an adapter
that pools its {{ patches }} patch tokens into {{ prefix }} prefix tokens, a {{ language }} language model, a
CLIP-style alignment head, and a Gaussian episodic memory read into the language model's attention as key/value
pairs.

## Quick start

```python
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

repo = "{{ repo_id }}"
model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
image = Image.new("RGB", ({{ image_size }}, {{ image_size }}), "white")
inputs = processor(images=[image], text=[""], return_tensors="pt")
with torch.no_grad():
    generated = model.generate(**inputs, max_new_tokens=12, do_sample=False)
print(processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])

# Chat: the processor's chat template turns {"type": "image"} items into the image placeholder; replies end at
# the turn end (<|im_end|>), which generation_config.json lists among the EOS tokens.
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is it?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
chat = processor(images=[image], text=[prompt], return_tensors="pt")
reply = model.generate(**chat, max_new_tokens=12, do_sample=False)

# Episodic memory: write an episode (row i = step i), ask about it later; it persists across generate calls.
model.write_memory(**processor(images=[image], text=["image 1: a white picture"], return_tensors="pt"))
question = processor(text=["what colour was image 1?"], return_tensors="pt")
recalled = model.generate(**question, use_memory=True, max_new_tokens=4, do_sample=False)
model.reset_memory()  # save_memory(folder) / load_memory(folder) keep it; write_episodes/forget_episodes batch it
```

## Architecture

| part | config |
|---|---|
| vision tower | `{{ vision }}`: {{ image_size }}² px, {{ patches }} patches × {{ vision_dim }} |
| adapter | Linear {{ vision_dim }}→{{ hidden }} → MLP {{ hidden }}→{{ mlp }}→{{ hidden }} (GELU) → cross-attention pooling, {{ prefix }} learned queries → positions → LayerNorm |
| language model | `{{ language }}`: {{ layers }} layers, hidden {{ hidden }}, {{ heads }} query heads, {{ kv_heads }} KV heads, vocab {{ vocab }} |
| episodic memory | {{ slots }} slots × {{ hidden }}; read-outs projected to per-layer key/values ({{ kv_heads }} KV heads) and gated by ScopeNet |

Parameters: {{ parameters }}.

## Training recipe

See the MicroVLM repository's README (`python -m microvlm.train`).

## Evaluation

Evaluated on `{{ dataset }}` ({{ eval_split }} split). Every figure is shown beside its baseline from the same run.

| task | metric | MicroVLM | baseline | chance |
|---|---|---|---|---|
{{ table }}

## Intended use and limitations

A research and teaching model: small enough to train on a laptop CPU, meant for experiments on vision-language
adapters and episodic memory. It is not meant for any decision about people.
"""

# What training leaves in its output folder and a model repository does not need.
TRAINING_FILES = (
    "checkpoint-*",
    "runs",
    "*.pt",
    "trainer_state.json",
    "training_args.bin",
    "optimizer*",
    "scheduler*",
    "rng_state*",
    "gradient_flow.jsonl",
    "visualisations",
)


def eval_results_of(eval_results: EvalResults) -> list[EvalResult]:
    """The card's `model-index` entries from the evaluation's headline figures."""
    name, split = eval_results.dataset, eval_results.split
    dataset = {"dataset_type": name, "dataset_name": name, "dataset_split": split}
    return [
        EvalResult(
            task_type="image-text-to-text",
            task_name=entry.task,
            **dataset,
            metric_type=entry.metric,
            metric_name=entry.name,
            metric_value=entry.value,
        )
        for entry in eval_results.headline
    ]


def hub_ids(*names: str | None) -> list[str]:
    """The names that are Hub repository ids ("owner/name", not a local folder)."""
    return [name for name in names if name and name.count("/") == 1 and not Path(name).exists()]


def parameter_count(config: MicroVLMConfig) -> int:
    """Parameters of the model the config builds (a tied LM head counted once), built on the meta device."""
    with torch.device("meta"):
        return MicroVLMForCausalLM(config).num_parameters()


def model_card(folder: Path, repo_id: str, eval_results: EvalResults, license_name: str) -> ModelCard:
    config = MicroVLMConfig.from_pretrained(folder)
    vision, text = config.vision_config, config.text_config
    card_data = ModelCardData(
        license=license_name,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=["microvlm", "vision-language", "episodic-memory", "larimar", "custom_code"],
        base_model=hub_ids(vision._name_or_path, text._name_or_path) or None,
        datasets=hub_ids(eval_results.dataset) or None,  # the built-in set is no Hub dataset
        model_name=repo_id,
        eval_results=eval_results_of(eval_results),
    )
    rows = [
        f"| {e.task} | {e.name} | {e.value:.4g} | {e.baseline_name} {e.baseline:.4g} | "
        f"{'–' if e.chance is None else f'{e.chance:.4g}'} |"
        for e in eval_results.headline
    ]
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        title=repo_id.split("/")[-1],
        repo_id=repo_id,
        vision=vision._name_or_path or vision.model_type,
        language=text._name_or_path or text.model_type,
        patches=config.num_patches,
        prefix=config.num_image_tokens,
        image_size=vision.image_size,
        vision_dim=config.vision_hidden_size,
        hidden=text.hidden_size,
        mlp=config.adapter_mlp_ratio * text.hidden_size,
        layers=text.num_hidden_layers,
        heads=text.num_attention_heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        vocab=text.vocab_size,
        slots=config.memory_num_slots,
        parameters=f"{parameter_count(config):,}",
        dataset=eval_results.dataset,
        eval_split=eval_results.split,
        table="\n".join(rows),
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
    eval_results = EvalResults.load(eval_json)
    if output.exists():
        shutil.rmtree(output)
    shutil.copytree(model_dir, output, ignore=shutil.ignore_patterns(*TRAINING_FILES))
    shutil.copy(eval_json, output / "eval_results.json")
    model_card(output, repo_id, eval_results, license_name).save(output / "README.md")
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
