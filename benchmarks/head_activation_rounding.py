"""What int8 activations cost the packed LM head: logits of the int4 head of an export ("microvlm-v" dims, the
default `python -m microvlm.export` form: groups of 64, float16 scales) with the head's input quantised per token
to int8 (what the kernel and its fallback compute, `packed_weights.Int4Weight.linear`) against the same dequantised
weights times the float hidden states.

Random weights (normal, the text config's initializer_range) and random final hidden states: unit Gaussian, and
the same with a few outlier channels (--outliers channels × --outlier_scale), as trained LMs have, which coarsen
the per-token absmax grid. Prints max and mean |Δlogit| relative to the logits' std and the top-1 agreement, and
for scale the top-1 agreement of the float-activation int4 head with the float32 weights it was quantised from
(random logits have small top-1 margins, so both agreements are lower than a trained model's).
"""

import argparse

import torch

from microvlm import MicroVLMConfig
from microvlm.packed_weights import Int4Weight


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="microvlm-v")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--group_size", type=int, default=64)
    parser.add_argument("--outliers", type=int, default=4)
    parser.add_argument("--outlier_scale", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    text = MicroVLMConfig.from_preset(args.preset).text_config
    weight = torch.randn(text.vocab_size, text.hidden_size) * text.initializer_range
    form = Int4Weight(torch.float32, tuple(weight.shape), args.group_size)
    stored = form.right_inverse(weight)
    dequantised = form(*stored)
    hidden = torch.randn(args.tokens, text.hidden_size)
    with_outliers = hidden.clone()
    with_outliers[:, torch.randperm(text.hidden_size)[: args.outliers]] *= args.outlier_scale
    print(
        f"{args.preset}: {text.vocab_size} x {text.hidden_size} int4 head (groups of {args.group_size}), "
        f"{args.tokens} random hidden states"
    )
    print(
        f"{'hidden states':<32} | max |dlogit| / std | mean |dlogit| / std | top-1 agreement "
        "| int4 vs fp32 weights: top-1"
    )
    for name, x in (
        ("unit Gaussian", hidden),
        (f"{args.outliers} outlier channels x{args.outlier_scale:g}", with_outliers),
    ):
        reference = x @ dequantised.T  # float activations
        logits = form.linear(x, *stored)  # int8 activations (the kernel where it applies)
        delta, std = (logits - reference).abs(), reference.std()
        agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean()
        weights_agreement = ((x @ weight.T).argmax(-1) == reference.argmax(-1)).float().mean()
        print(
            f"{name:<32} | {delta.max() / std:18.4f} | {delta.mean() / std:19.5f} | {agreement:15.1%} "
            f"| {weights_agreement:27.1%}"
        )


if __name__ == "__main__":
    main()
