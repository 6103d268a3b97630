"""Parameter counts per component of MicroVLM presets, built on the meta device (nothing is allocated), and the
share that trains in each stage under the preset's recipe (`--recipe`, default `configs/<preset>.json` when there
is one, else the plain stage configs), beside the seed's published totals where it gave some.

    python benchmarks/parameter_counts.py microvlm-m microvlm-v
    python benchmarks/parameter_counts.py ember-base ember-lite ember-reasoning --recipe ember \
        --stages stage1 stage2 robot_selection reasoning_heads

Tied weights count once (an LM head tied to the embedding adds nothing). "without memory" leaves out the episodic
memory's modules (encoder, prior, W_M, ScopeNet), which every MicroVLM builds but EmberVLM never switches on.
"""

import argparse

import torch

from microvlm import MicroVLMConfig, MicroVLMForCausalLM
from microvlm.export.size_report import COMPONENTS, component
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=["microvlm-m", "microvlm-v"])
    parser.add_argument("--recipe", default=None, help="recipe in configs/ (default: the preset's own, if any)")
    parser.add_argument("--stages", nargs="+", default=["stage1", "stage2"])
    args = parser.parse_args()
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
