"""Parameter counts per component of MicroVLM presets, built on the meta device (nothing is allocated), and the
share that trains in each stage under the preset's recipe (`--recipe`, default `configs/<preset>.json` when there
is one, else the plain stage configs), beside the seed's published totals where it gave some.

    python benchmarks/parameter_counts.py microvlm-m microvlm-v
    python benchmarks/parameter_counts.py ember-base ember-lite ember-reasoning --recipe ember \
        --stages stage1 stage2 robot_selection reasoning_heads

Tied weights count once (an LM head tied to the embedding adds nothing). "without memory" leaves out the episodic
memory's modules (encoder, prior, W_M, ScopeNet), which every MicroVLM builds but EmberVLM never switches on.

    python benchmarks/parameter_counts.py --repvit

instead counts the RepViT vision tower (`microvlm/repvit.py`) for timm's RepViT variants at 224 px, next to what
timm and the RepViT paper publish: timm's figure adds its two 1000-class heads (classifier and distillation, each
BatchNorm1d + Linear) to the training-form tower; the paper's is the re-parameterised network (every conv-BN folded
into one convolution with bias, each token mixer's three branches into one depthwise convolution) with the two heads
averaged into one Linear.
"""

import argparse

import torch

from microvlm import MicroVLMConfig, MicroVLMForCausalLM, RepViTConfig, RepViTModel
from microvlm.export.size_report import COMPONENTS, component
from microvlm.repvit import RepViTConvNorm, RepViTTokenMixer
from microvlm.train.cli import CONFIGS_DIR, freeze_for_stage, stage_defaults


# The seed's parameter table (EmberVLM: total / trainable, in millions); the other seeds give component sizes only.
SEED_TOTALS = {"ember-base": (48.3, 36.6), "ember-lite": (32.0, 25.0)}


def component_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters per component of `size_report.COMPONENTS` (the export's size report uses the same split)."""
    counts = {label: 0 for label, _ in COMPONENTS}
    for name, param in model.named_parameters():
        counts[component(name)] += param.numel()
    return counts


def trainable_share(preset: str, stage: str, recipe: str | None = None) -> tuple[int, int]:
    """(trainable, total) parameters of a fresh meta-device model of `preset` frozen as `stage` says under
    `recipe` (default: `configs/<preset>.json` when there is one)."""
    if recipe is None and (CONFIGS_DIR / f"{preset}.json").is_file():
        recipe = preset
    values = stage_defaults(stage, recipe)
    with torch.device("meta"):
        model = MicroVLMForCausalLM(MicroVLMConfig.from_preset(preset, use_memory=True))
    counts = freeze_for_stage(
        model, values["train_groups"], values["trainable_lm_layers"], values.get("trainable_vision_layers", 0)
    )
    return sum(counts.values()), sum(p.numel() for p in model.parameters())


# timm's non-legacy RepViT variants (timm/models/repvit.py) and their "#params" in the official RepViT table
# (github.com/THU-MIG/RepViT README, the figures of the paper).
REPVIT_VARIANTS = {
    "repvit_m0_9": ({"hidden_sizes": [48, 96, 192, 384], "depths": [2, 2, 14, 2]}, 5.1),
    "repvit_m1_0": ({"hidden_sizes": [56, 112, 224, 448], "depths": [2, 2, 14, 2]}, 6.8),
    "repvit_m1_1": ({"hidden_sizes": [64, 128, 256, 512], "depths": [2, 2, 12, 2]}, 8.2),
    "repvit_m1_5": ({"hidden_sizes": [64, 128, 256, 512], "depths": [4, 4, 24, 4]}, 14.0),
    "repvit_m2_3": ({"hidden_sizes": [80, 160, 320, 640], "depths": [6, 6, 34, 2]}, 22.9),
}
# "Params (M)" of timm's model cards (huggingface.co/timm/repvit_m0_9.dist_450e_in1k and so on).
TIMM_CARD_PARAMS = {"repvit_m0_9": 5.5, "repvit_m1_0": 7.3, "repvit_m1_1": 8.8}
IMAGENET_CLASSES = 1000


def reparameterised_count(tower: RepViTModel) -> int:
    """Parameters of the tower after structural re-parameterisation: a conv-BN keeps its convolution plus one bias
    per channel (γ, β → b), and a token mixer's 1×1 branch and outer BN fold into its k×k depthwise convolution."""
    total = sum(p.numel() for p in tower.parameters())
    for module in tower.modules():
        if isinstance(module, RepViTConvNorm):
            total -= module.normalization.num_features  # 2C (γ, β) become C (bias)
        elif isinstance(module, RepViTTokenMixer):
            total -= sum(p.numel() for p in module.pointwise.parameters())
            total -= sum(p.numel() for p in module.normalization.parameters())
    return total


def repvit_table() -> None:
    """Markdown table of the RepViT tower's parameters per timm variant against the published figures."""
    print("| variant | tower (RepViTModel) | + timm's 2 heads | timm card | re-parameterised + 1 head | paper |")
    print("|---|---|---|---|---|---|")
    for name, (dims, paper) in REPVIT_VARIANTS.items():
        with torch.device("meta"):
            tower = RepViTModel(RepViTConfig(image_size=224, **dims))
        width = tower.config.hidden_sizes[-1]
        head = width * IMAGENET_CLASSES + IMAGENET_CLASSES  # Linear(C, 1000)
        tower_count = sum(p.numel() for p in tower.parameters())
        with_heads = tower_count + 2 * (head + 2 * width)  # classifier and distillation head, each BN1d + Linear
        deployed = reparameterised_count(tower) + head
        card = f"{TIMM_CARD_PARAMS[name]}M" if name in TIMM_CARD_PARAMS else "–"
        print(
            f"| {name} | {tower_count / 1e6:.2f}M | {with_heads / 1e6:.2f}M | {card} | {deployed / 1e6:.2f}M | "
            f"{paper}M |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=["microvlm-m", "microvlm-v"])
    parser.add_argument("--recipe", default=None, help="recipe in configs/ (default: the preset's own, if any)")
    parser.add_argument("--stages", nargs="+", default=["stage1", "stage2"])
    parser.add_argument("--repvit", action="store_true", help="count the RepViT tower's timm variants instead")
    args = parser.parse_args()
    if args.repvit:
        repvit_table()
        return
    columns = {}
    for preset in args.presets:
        with torch.device("meta"):
            columns[preset] = component_counts(
                MicroVLMForCausalLM(MicroVLMConfig.from_preset(preset, use_memory=True))
            )
    print("| component | " + " | ".join(args.presets) + " |")
    print("|---|" + "---|" * len(args.presets))
    for label, _ in COMPONENTS:
        print(f"| {label} | " + " | ".join(f"{columns[p][label] / 1e6:.2f}M" for p in args.presets) + " |")
    print("| **total** | " + " | ".join(f"**{sum(columns[p].values()) / 1e6:.1f}M**" for p in args.presets) + " |")
    without_memory = [
        sum(n for label, n in columns[p].items() if not label.startswith("memory")) / 1e6 for p in args.presets
    ]
    print("| total without memory | " + " | ".join(f"{total:.1f}M" for total in without_memory) + " |")
    for stage in args.stages:
        shares = [trainable_share(preset, stage, args.recipe) for preset in args.presets]
        cells = [f"{trained / 1e6:.1f}M ({100 * trained / total:.1f}%)" for trained, total in shares]
        print(f"| trainable in {stage} | " + " | ".join(cells) + " |")
    if any(preset in SEED_TOTALS for preset in args.presets):
        claims = [SEED_TOTALS.get(preset) for preset in args.presets]
        cells = [f"{total}M / {trained}M" if total else "–" for total, trained in (c or (None, None) for c in claims)]
        print("| seed's total / trainable | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
