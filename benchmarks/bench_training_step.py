"""Stage-2 training step time of MicroVLM against a plain Qwen2ForCausalLM step of the same dims and sequence
length (prefix included), so the overhead of vision tower, adapter and memory is visible. Random weights, CPU.

For each preset: one optimizer step (forward, backward, AdamW) on a batch of B rows of seq tokens, memory on with
an episode of E steps per row (stage 2), the last 4 LM layers, adapter, alignment, memory and ScopeNet trained;
the baseline trains the same LM parameters on B rows of the same total length. Medians of --repeats steps.
With --profile, one MicroVLM step per preset (after a warm-up) runs under `torch.profiler` instead, and the top
operators by self CPU time are printed (the README's table).
"""

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

from microvlm import MicroVLMConfig, MicroVLMForCausalLM
from microvlm.train.cli import freeze_for_stage


def train_step(model, optimizer: torch.optim.Optimizer, inputs: dict) -> None:
    model(**inputs).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_seconds(model, inputs: dict, repeats: int) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for index in range(repeats + 1):
        start = time.perf_counter()
        train_step(model, optimizer, inputs)
        if index:  # the first step warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def print_profile(model, inputs: dict, rows: int = 15) -> None:
    """The top `rows` operators by self CPU time of one step (forward, backward, AdamW) after a warm-up step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    train_step(model, optimizer, inputs)  # warm-up, and the optimizer's state
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        train_step(model, optimizer, inputs)
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48))


def inputs_for(config: MicroVLMConfig, batch: int, seq: int, episode: int) -> dict:
    k, size = config.num_image_tokens, config.vision_config.image_size
    vocab = config.text_config.vocab_size
    ids = torch.randint(10, min(vocab, 2000), (batch, seq))
    ids[:, :k] = config.image_token_id
    episode_ids = torch.randint(10, min(vocab, 2000), (batch, episode, k + 12))
    episode_ids[..., :k] = config.image_token_id
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids,
        "pixel_values": torch.randn(batch, 3, size, size),
        "episode_input_ids": episode_ids,
        "episode_attention_mask": torch.ones_like(episode_ids),
        "episode_pixel_values": torch.randn(batch, episode, 3, size, size),
        "episode_mask": torch.ones(batch, episode),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,microvlm-v")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--episode", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="print the top operators of a MicroVLM step")
    args = parser.parse_args()
    print(
        f"{'preset':>11} | MicroVLM step s | Qwen2 step s | ratio   "
        f"(B={args.batch}, seq {args.seq} incl. prefix, episode {args.episode})"
    )
    for name in args.presets.split(","):
        torch.manual_seed(0)
        config = MicroVLMConfig.from_preset(name, use_memory=True)
        model = MicroVLMForCausalLM(config).train()
        freeze_for_stage(model, ["adapter", "alignment", "memory", "scope_net"], 4)
        if args.profile:
            print_profile(model, inputs_for(config, args.batch, args.seq, args.episode))
            continue
        ours = step_seconds(model, inputs_for(config, args.batch, args.seq, args.episode), args.repeats)
        del model
        lm = AutoModelForCausalLM.from_config(config.text_config).train()
        lm.requires_grad_(False)
        lm.model.layers[-4:].requires_grad_(True)
        ids = torch.randint(10, 2000, (args.batch, args.seq))
        plain = step_seconds(lm, {"input_ids": ids, "labels": ids}, args.repeats)
        print(f"{name:>11} | {ours:15.3f} | {plain:12.3f} | {ours / plain:.2f}")


if __name__ == "__main__":
    main()
