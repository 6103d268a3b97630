"""Greedy decode ms/token and prefill time at "microvlm-v" dims (random weights, CPU), all rows in one run:

* plain `Qwen2ForCausalLM` (the same text config) in float32 and bfloat16, on a prompt of the same length;
* MicroVLM in float32 and bfloat16: one image prefix + text, memory on with an episode of --episode written steps;
* the exported ternary MicroVLM (LM body trained with `lm_use_bitnet`, packed by `python -m microvlm.export
  --embedding fp32 --vision fp32 --rest fp32`, loaded through its remote code), with the native kernel
  (`microvlm/ternary_kernel.py`) and with the pure-PyTorch fallback, same prompt and memory.

prefill = time of `generate(max_new_tokens=1)`; decode ms/token = (time of `generate(N)` − prefill) / (N − 1), with
N = --new_tokens; medians of --repeats after a warm-up. Ratios are speeds (time of the reference / time of the row).
The last lines split one ternary decode step: the fp32 LM head (vocab × hidden) against the rest.
"""

import argparse
import logging
import tempfile

import torch
from bench_memory import median_seconds
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

from microvlm import MicroVLMConfig, MicroVLMForCausalLM
from microvlm.export import WeightFormats, write_export
from microvlm.ternary_kernel import load_ternary_kernel, ternary_kernel_disabled


logger = logging.getLogger("bench_generate")


def prompt(config: MicroVLMConfig, text_tokens: int, rows: int = 1) -> dict[str, torch.Tensor]:
    """`rows` prompts of k image placeholders + `text_tokens` random text tokens, with their images."""
    ids = torch.randint(10, 2000, (rows, config.num_image_tokens + text_tokens))
    ids[:, : config.num_image_tokens] = config.image_token_id
    size = config.vision_config.image_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(rows, 3, size, size)}


def timings(model, inputs: dict, new_tokens: int, repeats: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds per token) of greedy generation."""

    def generate(tokens: int):
        return model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

    prefill = median_seconds(lambda: generate(1), repeats)
    total = median_seconds(lambda: generate(new_tokens), repeats)
    return prefill, (total - prefill) / (new_tokens - 1)


def microvlm_inputs(model, config: MicroVLMConfig, inputs: dict, episode: int, dtype: torch.dtype) -> dict:
    """Write an episode of `episode` steps into `model`'s memory; the prompt with pixels in `dtype`."""
    steps = prompt(config, 12, episode)
    model.reset_memory()
    model.write_memory(steps["input_ids"], steps["pixel_values"].to(dtype), steps["attention_mask"])
    return {**inputs, "pixel_values": inputs["pixel_values"].to(dtype)}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in {"new_tokens": 8, "text_tokens": 16, "episode": 2, "repeats": 2}.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    torch.manual_seed(0)
    config = MicroVLMConfig.from_preset("microvlm-v", use_memory=True)
    inputs = prompt(config, args.text_tokens)
    rows: dict[str, tuple[float, float]] = {}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        lm = Qwen2ForCausalLM(config.text_config).eval().to(dtype)
        rows[f"Qwen2 {name}"] = timings(lm, {"input_ids": inputs["input_ids"]}, args.new_tokens, args.repeats)
        del lm
        model = MicroVLMForCausalLM(config).eval().to(dtype)
        model_inputs = microvlm_inputs(model, config, inputs, args.episode, dtype)
        rows[f"MicroVLM {name}"] = timings(model, model_inputs, args.new_tokens, args.repeats)
        del model
    with tempfile.TemporaryDirectory() as folder:
        config.lm_use_bitnet = True
        write_export(
            MicroVLMForCausalLM(config).eval(),
            None,
            folder,
            WeightFormats(embedding="fp32", vision="fp32", rest="fp32"),
        )
        ternary = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ternary_inputs = microvlm_inputs(ternary, config, inputs, args.episode, torch.float32)
    kernel = "kernel" if load_ternary_kernel() is not None else "kernel NOT BUILT"
    rows[f"ternary MicroVLM, {kernel}"] = timings(ternary, ternary_inputs, args.new_tokens, args.repeats)
    with ternary_kernel_disabled():
        rows["ternary MicroVLM, fallback"] = timings(ternary, ternary_inputs, args.new_tokens, args.repeats)
    hidden = torch.randn(1, 1, config.text_config.hidden_size)
    head = median_seconds(lambda: ternary.lm_head(hidden), 5)
    print_table(rows, args, head)


def print_table(rows: dict[str, tuple[float, float]], args: argparse.Namespace, head: float) -> None:
    print(
        f"microvlm-v dims, random weights, {torch.get_num_threads()} threads; prompt: image prefix + "
        f"{args.text_tokens} text tokens, {args.new_tokens} new tokens, memory: {args.episode} steps"
    )
    print(f"{'model':<28} | prefill s | decode ms/token | speed vs MicroVLM fp32 | vs MicroVLM bf16")
    for name, (prefill, decode) in rows.items():
        print(
            f"{name:<28} | {prefill:9.3f} | {decode * 1e3:15.1f} | {rows['MicroVLM fp32'][1] / decode:22.2f} | "
            f"{rows['MicroVLM bf16'][1] / decode:16.2f}"
        )
    for name in ("fp32", "bf16"):
        print(f"MicroVLM / Qwen2 decode speed, {name}: {rows[f'Qwen2 {name}'][1] / rows[f'MicroVLM {name}'][1]:.2f}")
    ternary = rows[next(name for name in rows if "kernel" in name)][1]
    print(
        f"ternary decode step: fp32 LM head {head * 1e3:.1f} ms, the rest (ternary body, attention, memory) "
        f"{(ternary - head) * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
