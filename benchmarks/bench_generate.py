"""Greedy decode ms/token and prefill time at "microvlm-v" dims (random weights, CPU), all rows in one run:

* plain `Qwen2ForCausalLM` (the same text config) in float32 and bfloat16, on a prompt of the same length;
* MicroVLM in float32 and bfloat16: one image prefix + text, memory on with an episode of --episode written steps
  (timed interleaved with Qwen2 of the same dtype, call by call, so that a change of load hits both rows);
* the exported MicroVLM in the default form of `python -m microvlm.export` (ternary LM body trained with
  `lm_use_bitnet`, int4 tied embedding / LM head, int8 vision tower, adapter and memory), loaded through its remote
  code, with the native kernels (`microvlm/ternary_kernel.py`: ternary body and packed LM head) and with the
  pure-PyTorch fallback (skipped with --skip_fallback), same prompt and memory.

Each row runs `generate(max_new_tokens=N)` (N = --new_tokens) --repeats times after a warm-up, with a logits
processor that only records when each step's logits arrive: prefill = median time from the call to the first
logits; decode ms/token = median time between consecutive steps' logits (one forward, the greedy choice and the
cache update), so a noisy prefill does not leak into decode. Generation runs without an end-of-sequence token, so
every call makes N tokens and no other per-step processor (such as `min_new_tokens`'s) is timed. Ratios are speeds
(time of the reference / time of the row). The last lines split one decode step of the exported model with the
kernels (`torch.profiler` over the N − 1 decode steps of `generate(N)`, started when the prefill's logits arrive;
self CPU time per token): LM head, ternary layers, attention, the other operators, and the profiled steps' wall time
minus all operators (Python: module calls, transformers' decoder layers and `generate` loop, operator dispatch; the
profiler's own overhead inflates it). The machine's load averages are printed before and after: a shared machine
slows every row.
"""

import argparse
import logging
import os
import statistics
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, LogitsProcessorList, Qwen2ForCausalLM
from transformers.generation import LogitsProcessor

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


class StepClock(LogitsProcessor):
    """Records the time at which each generation step's logits arrive (scores unchanged)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.times.append(time.perf_counter())
        return scores


def generate(model, inputs: dict, tokens: int, clock: LogitsProcessor | None = None) -> torch.Tensor:
    """Greedy generation of exactly `tokens` new tokens (no end-of-sequence token); `clock` sees every step's
    logits."""
    processors = LogitsProcessorList([clock] if clock is not None else [])
    settings = {"max_new_tokens": tokens, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    out = model.generate(**inputs, **settings, logits_processor=processors)
    if out.shape[1] != inputs["input_ids"].shape[1] + tokens:
        raise RuntimeError(f"generate made {out.shape[1] - inputs['input_ids'].shape[1]} tokens, not {tokens}")
    return out


def timings(runs: dict[str, tuple], new_tokens: int, repeats: int) -> dict[str, tuple[float, float]]:
    """name → (prefill seconds, decode seconds per token) of greedy generation for each (model, inputs) of `runs`:
    medians over --repeats calls after a warm-up of the time to the first logits and of the time between
    consecutive steps' logits. The models take turns, call by call."""
    for model, inputs in runs.values():
        model.generation_config.eos_token_id = None
        generate(model, inputs, 2)
    prefills: dict[str, list[float]] = {name: [] for name in runs}
    steps: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (model, inputs) in runs.items():
            clock, start = StepClock(), time.perf_counter()
            generate(model, inputs, new_tokens, clock)
            prefills[name].append(clock.times[0] - start)
            steps[name] += [later - earlier for earlier, later in zip(clock.times, clock.times[1:])]
    return {name: (statistics.median(prefills[name]), statistics.median(steps[name])) for name in runs}


DECODE_PARTS = {  # profiler operator → part of a decode step
    "microvlm_ternary::packed_linear": "LM head (packed int4 x int8 kernel)",
    "microvlm_ternary::linear": "ternary layers (kernel)",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
}
OTHER_OPERATORS = "other operators (norms, rotary, SiLU, cache, embedding)"
OUTSIDE_OPERATORS = "outside operators (Python, dispatch, profiler)"


class ProfileDecode(LogitsProcessor):
    """Starts `profiler` when the first (prefill) logits arrive, so that it records the decode steps only."""

    def __init__(self, profiler: profile):
        self.profiler, self.start = profiler, None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:
            self.profiler.start()
            self.start = time.perf_counter()
        return scores


def decode_breakdown(model, inputs: dict, new_tokens: int) -> dict[str, float]:
    """Self CPU seconds per decode token by part (`DECODE_PARTS`, else `OTHER_OPERATORS`), profiled over the
    N − 1 decode steps of generate(N); `OUTSIDE_OPERATORS` = those steps' wall time − the operators' sum."""
    profiler = profile(activities=[ProfilerActivity.CPU])
    recorder = ProfileDecode(profiler)
    generate(model, inputs, new_tokens, recorder)
    wall = time.perf_counter() - recorder.start
    profiler.stop()
    parts: dict[str, float] = {}
    for event in profiler.key_averages():
        part = DECODE_PARTS.get(event.key, OTHER_OPERATORS)
        parts[part] = parts.get(part, 0.0) + event.self_cpu_time_total / 1e6 / (new_tokens - 1)
    return {**parts, OUTSIDE_OPERATORS: wall / (new_tokens - 1) - sum(parts.values())}


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
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--skip_fallback", action="store_true", help="skip the slow pure-PyTorch ternary row")
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    torch.manual_seed(0)
    config = MicroVLMConfig.from_preset("microvlm-v", use_memory=True)
    inputs = prompt(config, args.text_tokens)
    rows: dict[str, tuple[float, float]] = {}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        lm = Qwen2ForCausalLM(config.text_config).eval().to(dtype)
        model = MicroVLMForCausalLM(config).eval().to(dtype)
        runs = {
            f"Qwen2 {name}": (lm, {"input_ids": inputs["input_ids"]}),
            f"MicroVLM {name}": (model, microvlm_inputs(model, config, inputs, args.episode, dtype)),
        }
        rows.update(timings(runs, args.new_tokens, args.repeats))
        del lm, model, runs
    with tempfile.TemporaryDirectory() as folder:
        config.lm_use_bitnet = True
        write_export(MicroVLMForCausalLM(config).eval(), None, folder, WeightFormats())
        ternary = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ternary_inputs = microvlm_inputs(ternary, config, inputs, args.episode, torch.float32)
    kernel = "kernels" if load_ternary_kernel() is not None else "kernels NOT BUILT"
    rows.update(timings({f"1.58-bit export, {kernel}": (ternary, ternary_inputs)}, args.new_tokens, args.repeats))
    breakdown = decode_breakdown(ternary, ternary_inputs, args.new_tokens)
    if not args.skip_fallback:
        with ternary_kernel_disabled():
            fallback = {"1.58-bit export, fallback": (ternary, ternary_inputs)}
            rows.update(timings(fallback, args.new_tokens, args.repeats))
    print_table(rows, args, breakdown, (load_before, os.getloadavg()))


def print_table(
    rows: dict[str, tuple[float, float]],
    args: argparse.Namespace,
    breakdown: dict[str, float],
    loads: tuple[tuple[float, ...], tuple[float, ...]],
) -> None:
    before, after = (", ".join(f"{x:.2f}" for x in load) for load in loads)
    print(
        f"microvlm-v dims, random weights, {torch.get_num_threads()} threads; prompt: image prefix + "
        f"{args.text_tokens} text tokens, {args.new_tokens} new tokens, memory: {args.episode} steps; load average "
        f"(1, 5, 15 min) before {before}, after {after}"
    )
    print(f"{'model':<28} | prefill s | decode ms/token | speed vs MicroVLM fp32 | vs MicroVLM bf16")
    for name, (prefill, decode) in rows.items():
        print(
            f"{name:<28} | {prefill:9.3f} | {decode * 1e3:15.1f} | {rows['MicroVLM fp32'][1] / decode:22.2f} | "
            f"{rows['MicroVLM bf16'][1] / decode:16.2f}"
        )
    for name in ("fp32", "bf16"):
        print(f"MicroVLM / Qwen2 decode speed, {name}: {rows[f'Qwen2 {name}'][1] / rows[f'MicroVLM {name}'][1]:.2f}")
    print("1.58-bit export with kernels, one decode step by part (profiled, self CPU ms/token):")
    for part, seconds in sorted(breakdown.items(), key=lambda item: -item[1]):
        print(f"  {part:<58} {seconds * 1e3:8.1f}")


if __name__ == "__main__":
    main()
