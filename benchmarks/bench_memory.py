"""Cost of the Larimar memory at "microvlm-v" dims, random weights, CPU (figures quoted in the README).

1. One episode write + read (E=4 steps, B=8 episodes, K=512 slots, codes of a 512-dim key + a 2 × 896-dim value,
   see `memory_encoder.py`) as a fraction of one Qwen2.5-0.5B-dims forward over the same batch (B=8 sequences of
   64 tokens).
2. Write and read time of that episode as K grows (128, 256, 512, 1024; key dim = K, the least exact reads allow).
Medians of --repeats runs after a warm-up, torch.no_grad, float32, the machine's threads.
"""

import argparse
import statistics
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from microvlm import MicroVLMConfig
from microvlm.larimar_memory import LarimarMemory
from microvlm.memory_encoder import MemoryEncoder


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--episode", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = MicroVLMConfig.from_preset("microvlm-v")
    text = config.text_config
    lm = Qwen2ForCausalLM(Qwen2Config(**text.to_dict())).eval()
    ids = torch.randint(0, text.vocab_size, (args.batch, args.seq))
    lm_time = median_seconds(lambda: lm(input_ids=ids), args.repeats)

    def episode_cost(slots: int, key_dim: int) -> tuple[float, float]:
        code_dim = MemoryEncoder(text.hidden_size, key_dim).code_dim
        memory = LarimarMemory(slots, code_dim, key_dim=key_dim, pinv_method=config.memory_pinv_method).eval()
        z = torch.randn(args.episode, args.batch, code_dim)
        prior = memory.prior(args.batch)
        write = median_seconds(lambda: memory.write(z, prior), args.repeats)
        state = memory.write(z, prior)
        read = median_seconds(lambda: memory.read(z, state), args.repeats)
        return write, read

    write, read = episode_cost(config.memory_num_slots, config.memory_key_dim)
    print(f"LM forward (B={args.batch}, seq {args.seq}, Qwen2.5-0.5B dims): {lm_time * 1e3:.1f} ms")
    print(
        f"memory write+read (E={args.episode}, B={args.batch}, K={config.memory_num_slots}, "
        f"codes of {MemoryEncoder(text.hidden_size, config.memory_key_dim).code_dim} with a {config.memory_key_dim}-dim key): "
        f"{(write + read) * 1e3:.1f} ms = {(write + read) / lm_time:.3f} x LM forward"
    )
    print(f"{'K':>6} | write ms | read ms | write / write(K=128)")
    base = None
    for slots in (128, 256, 512, 1024):
        write, read = episode_cost(slots, slots)
        base = base or write
        print(f"{slots:>6} | {write * 1e3:8.1f} | {read * 1e3:7.1f} | {write / base:.2f}")


if __name__ == "__main__":
    main()
