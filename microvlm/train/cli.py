"""Train MicroVLM with the HF `Trainer`: `python -m microvlm.train --stage stage1|stage2|both --recipe demo ...`.

Settings come, lowest precedence first, from the stage config (`configs/<stage>.json`), the recipe
(`configs/<recipe>.json`: `all` and per-stage sections) and the command line: every dataclass field below and
every `TrainingArguments` field is a flag. `--stage both` runs stage 1, then stage 2 from stage 1's result; a
comma-separated list (`--stage stage1,stage2,robot_selection,reasoning_heads,reasoning`, EmberVLM's four stages
with `--recipe ember`) runs each stage from the previous one's result, each in `<output_dir>/<stage>`.
The same script runs under `accelerate launch` and `torchrun`.
"""

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import HfArgumentParser, TrainingArguments, set_seed

from ..configuration_microvlm import MicroVLMConfig
from ..data.collator import MicroVLMCollator
from ..data.synthetic_shapes import COLOURS, build_synthetic_dataset
from ..modeling_microvlm import MicroVLMForCausalLM
from ..processing_microvlm import MicroVLMProcessor
from ..two_stream_vision import TwoStreamVisionModel
from .callbacks import (
    GradientFlowCallback,
    MemoryCheckpointCallback,
    QuantisationWarmupCallback,
    VisualisationCallback,
    group_of,
)
from .colour_free import ColourFreeConsistency, vision_tower
from .quantization import add_qlora, nf4_quantization_config
from .trainer import MicroVLMTrainer


logger = logging.getLogger("microvlm.train")

CONFIGS_DIR = Path(__file__).parent.parent / "configs"
STAGES = ("stage1", "stage2", "quantized", "robot_selection", "reasoning_heads", "reasoning")
DEFAULT_PRESET = "tiny"


@dataclass
class ModelArguments:
    preset: str | None = field(
        default=None,
        metadata={
            "help": "MicroVLM preset (MicroVLMConfig.preset_names()) to build when not starting from a folder "
            "(default: tiny); with --vision_model/--language_model, the preset that sizes the parts around them"
        },
    )
    init_from: str | None = field(default=None, metadata={"help": "a saved MicroVLM folder to start from"})
    vision_model: str | None = field(default=None, metadata={"help": "pretrained vision tower (hub id or folder)"})
    language_model: str | None = field(default=None, metadata={"help": "pretrained LM (hub id or folder)"})
    use_memory: bool = field(default=False, metadata={"help": "read the episodic memory in this stage"})
    train_groups: list[str] = field(
        default_factory=lambda: ["adapter", "alignment"],
        metadata={
            "help": "module groups to train: vision, adapter, alignment, memory, scope_net, language, reasoning"
        },
    )
    trainable_lm_layers: int = field(default=0, metadata={"help": "also train the last N decoder layers of the LM"})
    trainable_vision_layers: int = field(
        default=0, metadata={"help": "also train the last N blocks of the vision tower (DeiT: 4 of 12)"}
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "NF4 4-bit frozen vision tower and LM (bitsandbytes)"})
    lora_rank: int = field(default=0, metadata={"help": "QLoRA on the LM's seven projections with this rank (0: off)"})
    lm_use_bitnet: bool = field(default=False, metadata={"help": "BitNet b1.58 QAT of the LM's seven projections"})
    memory_use_bitnet: bool = field(default=False, metadata={"help": "BitNet b1.58 ternary W_M and ScopeNet"})
    bitnet_warmup_steps: int = field(default=0, metadata={"help": "BitNet λ: full precision → ternary over N steps"})


@dataclass
class DataArguments:
    dataset: str = field(
        default="synthetic",
        metadata={"help": "'synthetic' or 'robot_selection' (built-in sets) or an image-text source"},
    )
    robot_images: bool = field(default=True, metadata={"help": "robot_selection: draw each task's scene"})
    sample_kinds: list[str] = field(
        default_factory=lambda: ["caption", "qa"], metadata={"help": "built-in sample kinds: caption, qa, recall"}
    )
    num_train: int = 2000
    num_validation: int = 200
    num_test: int = 200
    episode_size: int | None = field(
        default=None,
        metadata={
            "help": "built-in set: images per recall episode (the longest; default: the model config's "
            "memory_episode_size)"
        },
    )
    min_episode_size: int | None = field(
        default=None, metadata={"help": "built-in set: recall episodes take every length from this to episode_size"}
    )
    data_seed_offset: int = 0
    image_column: str = "image"
    text_column: str = "text"
    validation_split: str | None = field(
        default=None,
        metadata={"help": "split of --dataset evaluated during training (e.g. validation); default: no evaluation"},
    )
    max_length: int = 64


@dataclass
class RunArguments:
    stage: str = field(
        default="stage1",
        metadata={"help": f"one of {STAGES}, both (stage1,stage2), or a comma-separated list run in turn"},
    )
    recipe: str | None = field(default=None, metadata={"help": "named recipe in configs/: demo, test"})
    gradient_flow_steps: int = field(default=50, metadata={"help": "log gradient flow every N steps"})
    visualisation_steps: int = field(
        default=200, metadata={"help": "draw attention/addressing/similarity every N steps"}
    )
    colour_free_weight: float = field(
        default=0.0,
        metadata={
            "help": "weight of the colour-free consistency term (colour_free.py; needs a two-stream tower and the "
            "built-in set); 0: off"
        },
    )
    colour_free_start_step: int = field(
        default=0, metadata={"help": "the optimiser step from which the colour-free consistency term is added"}
    )


def read_config(name: str) -> dict[str, Any]:
    path = CONFIGS_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))
        raise ValueError(f"unknown config {name!r}: expected one of {known} in {CONFIGS_DIR}")
    values = json.loads(path.read_text())
    values.pop("_comment", None)
    return values


def stage_defaults(stage: str, recipe: str | None) -> dict[str, Any]:
    """Stage config, then the recipe's `all` section, then its section for this stage."""
    defaults = read_config(stage)
    if recipe:
        values = read_config(recipe)
        defaults.update(values.get("all", {}))
        defaults.update(values.get(stage, {}))
    return defaults


def parse(argv: list[str], stage: str, recipe: str | None):
    parser = HfArgumentParser((ModelArguments, DataArguments, RunArguments, TrainingArguments))
    # remove_unused_columns=False: the collator needs the raw columns (images, episodes), not the model's
    # signature. use_cpu on CPU-only machines: that is what makes torchrun/accelerate start gloo DDP there.
    defaults = {
        "output_dir": "outputs/microvlm",
        "remove_unused_columns": False,
        "report_to": "none",
        "save_strategy": "steps",
        "eval_strategy": "steps",
        "logging_strategy": "steps",
        "use_cpu": not torch.cuda.is_available(),
        **stage_defaults(stage, recipe),
    }
    parser.set_defaults(**defaults)
    return parser.parse_args_into_dataclasses(args=argv)


VISION_BLOCK_LISTS = (
    "layers",
    "encoder.layer",
    "encoder.stages",
)  # ViT/DeiT (transformers 5; 4: encoder.layer), ResNet


def vision_blocks(tower: nn.Module) -> list[nn.ModuleList]:
    """The vision tower's sequences of blocks, one per stream (DeiT-Tiny: its 12 encoder layers; ResNet, RepViT: their
    stages; the two-stream tower: each stream's stages)."""
    return [_block_list(stream) for stream in getattr(tower, "streams", (tower,))]


def _block_list(tower: nn.Module) -> nn.ModuleList:
    for path in VISION_BLOCK_LISTS:
        try:
            blocks = tower.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise ValueError(
        f"trainable_vision_layers: {type(tower).__name__} has no block list at {VISION_BLOCK_LISTS}. Train the whole "
        "tower with --train_groups vision ..., or set --trainable_vision_layers 0."
    )


def language_layers(language_model: nn.Module) -> nn.ModuleList:
    """The decoder layers of the LM body: `layers` (Qwen2, BitNet, Llama...) or `h` (GPT-2)."""
    for name in ("layers", "h"):
        layers = getattr(language_model, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(
        f"trainable_lm_layers: {type(language_model).__name__} has no decoder layer list (`layers` or `h`). Train the "
        "whole LM with --train_groups language ..., or set --trainable_lm_layers 0."
    )


def freeze_for_stage(
    model: MicroVLMForCausalLM, groups: list[str], trainable_lm_layers: int, trainable_vision_layers: int = 0
) -> dict[str, int]:
    """Train only the named groups, plus the last `trainable_lm_layers` LM layers and the last
    `trainable_vision_layers` vision blocks; returns trainable parameter counts by group."""
    model.requires_grad_(False)
    for name, param in model.named_parameters():
        if group_of(name) in groups and param.is_floating_point():  # 4-bit weights are frozen by nature
            param.requires_grad_(True)
    if trainable_lm_layers:
        language_layers(model.model.language_model)[-trainable_lm_layers:].requires_grad_(True)
    if trainable_vision_layers:
        for blocks in vision_blocks(model.model.vision_tower):
            blocks[-trainable_vision_layers:].requires_grad_(True)
    # The temperature stays fixed unless the config says it is learnable, whatever the groups say.
    model.model.alignment.log_logit_scale.requires_grad_(model.config.alignment_learnable_temperature)
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            counts[group_of(name)] = counts.get(group_of(name), 0) + param.numel()
    return counts


def build_model(model_args: ModelArguments, training_args: TrainingArguments) -> MicroVLMForCausalLM:
    """The stage's starting model: a saved folder, pretrained backbones, or a preset built from its config.

    With `load_in_4bit`, the vision tower and LM body are loaded in NF4 (from the folder, or from a copy of the
    freshly built model saved under `<output_dir>/initial`); MicroVLM's own parts stay in full precision.
    """
    source = model_args.init_from
    if source is None:
        if model_args.vision_model and model_args.language_model:
            model = MicroVLMForCausalLM.from_pretrained_backbones(
                model_args.vision_model, model_args.language_model, preset=model_args.preset
            )
        else:
            model = MicroVLMForCausalLM(MicroVLMConfig.from_preset(model_args.preset or DEFAULT_PRESET))
        if not model_args.load_in_4bit:
            model.config.use_memory = model_args.use_memory
            return model
        source = str(Path(training_args.output_dir) / "initial")
        model.save_pretrained(source)
    quantization = nf4_quantization_config(training_args.device) if model_args.load_in_4bit else None
    model = MicroVLMForCausalLM.from_pretrained(source, quantization_config=quantization)
    model.config.use_memory = model_args.use_memory
    return model


def build_processor(model_args: ModelArguments) -> MicroVLMProcessor:
    if model_args.init_from:
        return MicroVLMProcessor.from_pretrained(model_args.init_from)
    return MicroVLMProcessor.from_preset(model_args.preset or DEFAULT_PRESET)


def build_datasets(data_args: DataArguments, config: MicroVLMConfig, seed: int):
    if data_args.dataset == "synthetic":
        splits = build_synthetic_dataset(
            num_train=data_args.num_train,
            num_validation=data_args.num_validation,
            num_test=data_args.num_test,
            image_size=config.vision_config.image_size,
            episode_size=data_args.episode_size or config.memory_episode_size,
            min_episode_size=data_args.min_episode_size,
            seed=seed + data_args.data_seed_offset,
            kinds=data_args.sample_kinds,
        )
        return splits["train"], splits["validation"]
    if data_args.dataset == "robot_selection":
        from ..data.robot_selection import build_robot_selection_dataset

        splits = build_robot_selection_dataset(
            num_train=data_args.num_train,
            num_validation=data_args.num_validation,
            num_test=0,
            image_size=config.vision_config.image_size,
            seed=seed + data_args.data_seed_offset,
            with_images=data_args.robot_images,
        )
        return splits["train"], splits["validation"]
    from ..data.sources import SkipBadSamples, load_image_text_dataset

    def split(name: str) -> SkipBadSamples:
        return SkipBadSamples(
            load_image_text_dataset(
                data_args.dataset, split=name, image_column=data_args.image_column, text_column=data_args.text_column
            )
        )

    return split("train"), split(data_args.validation_split) if data_args.validation_split else None


def colour_free_settings(
    run_args: RunArguments,
    data_args: DataArguments,
    model: MicroVLMForCausalLM,
    processor: MicroVLMProcessor,
    pad_id: int,
) -> ColourFreeConsistency | None:
    """The colour-free consistency term's settings from `--colour_free_weight`, or None when it is 0. Raises when
    the model or the data cannot take it: it drops a two-stream tower's RGB stream and the built-in set's colour
    words, each of which must be one token (with its leading space)."""
    if not run_args.colour_free_weight:
        return None
    tower = vision_tower(model)
    if not isinstance(tower, TwoStreamVisionModel):
        raise ValueError(
            f"--colour_free_weight needs a two-stream vision tower (the tiny preset's), got {type(tower).__name__}; "
            "set --colour_free_weight 0"
        )
    if data_args.dataset != "synthetic":
        raise ValueError(
            "--colour_free_weight needs the built-in set (--dataset synthetic), whose colour words it removes; got "
            f"--dataset {data_args.dataset!r}: set --colour_free_weight 0"
        )
    colour_ids = []
    for colour in COLOURS:
        ids = processor.tokenizer(" " + colour, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(
                f"--colour_free_weight: the colour word {colour!r} is {len(ids)} tokens in this tokenizer; the term "
                "removes one token per colour word"
            )
        colour_ids.append(ids[0])
    return ColourFreeConsistency(
        weight=run_args.colour_free_weight,
        start_step=run_args.colour_free_start_step,
        colour_ids=torch.tensor(colour_ids),
        pad_id=pad_id,
    )


def build_trainer(
    stage: str, argv: list[str], recipe: str | None, init_from: str | None = None, stage_folder: bool = False
) -> MicroVLMTrainer:
    """Everything a stage needs, ready to `train()`: model, processor, data, collator, callbacks. The command line
    is parsed here, once, over the stage's defaults; with `stage_folder` the stage writes to `<output_dir>/<stage>`."""
    model_args, data_args, run_args, training_args = parse(argv, stage, recipe)
    if init_from is not None:
        model_args.init_from = init_from
    if stage_folder:
        training_args.output_dir = str(Path(training_args.output_dir) / stage)
    set_seed(training_args.seed)
    model = build_model(model_args, training_args)
    model.enable_bitnet(model_args.lm_use_bitnet, model_args.memory_use_bitnet)
    processor = build_processor(model_args)
    groups = model_args.train_groups
    counts = freeze_for_stage(model, groups, model_args.trainable_lm_layers, model_args.trainable_vision_layers)
    if model_args.lora_rank:
        model = add_qlora(model, rank=model_args.lora_rank, trainable_modules=[g for g in groups if g != "language"])
    logger.info("%s: trainable parameters by group %s", stage, counts)
    train_dataset, eval_dataset = build_datasets(data_args, model.config, training_args.seed)
    if eval_dataset is None:
        training_args.eval_strategy = "no"
    collator = MicroVLMCollator(processor, with_episodes=model_args.use_memory, max_length=data_args.max_length)
    probe = eval_dataset if eval_dataset is not None else train_dataset
    probe_batch = collator([probe[i] for i in range(min(8, len(probe)))])
    colour_free = colour_free_settings(run_args, data_args, model, processor, collator.pad_id)
    callbacks = [
        GradientFlowCallback(run_args.gradient_flow_steps),
        VisualisationCallback(probe_batch, run_args.visualisation_steps),
        MemoryCheckpointCallback(),
        QuantisationWarmupCallback(model_args.bitnet_warmup_steps),
    ]
    return MicroVLMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=processor,
        callbacks=callbacks,
        colour_free=colour_free,
    )


def run_stage(
    stage: str, argv: list[str], recipe: str | None, init_from: str | None = None, stage_folder: bool = False
) -> str:
    """Train one stage (see `build_trainer`) and save its final model + processor; returns the output folder."""
    trainer = build_trainer(stage, argv, recipe, init_from, stage_folder)
    trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    skipped = getattr(trainer.train_dataset, "skipped", None)
    if skipped:
        logger.warning("%s: skipped bad samples %s", stage, skipped)
    trainer.save_model(trainer.args.output_dir)
    if trainer.is_world_process_zero():
        trainer.save_state()
        summary = {k: v for k, v in trainer.state.log_history[-1].items() if isinstance(v, (int, float))}
        logger.info("%s done: %s → %s", stage, summary, trainer.args.output_dir)
    return trainer.args.output_dir


def main(argv: list[str] | None = None) -> list[str]:
    """Run the requested stage(s); returns the output folder of each."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # Only which stages and which recipe: each stage parses everything over its own defaults (`build_trainer`).
    parser = HfArgumentParser(RunArguments, add_help=False)
    run_args, _ = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    stages = ["stage1", "stage2"] if run_args.stage == "both" else run_args.stage.split(",")
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown:
        raise ValueError(
            f"--stage: unknown stage(s) {unknown}; expected one of {STAGES}, both, or a comma-separated list of them"
        )
    if len(stages) == 1:
        return [run_stage(stages[0], argv, run_args.recipe)]
    folders: list[str] = []
    for stage in stages:
        init_from = folders[-1] if folders else None
        folders.append(run_stage(stage, argv, run_args.recipe, init_from=init_from, stage_folder=True))
    return folders
