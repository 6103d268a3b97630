"""Error of MicroVLM's two addressing pseudo-inverses against torch.linalg.pinv (figures quoted in the README).

Random memories with unit-norm slots, K×C as in the presets; relative Frobenius error, float32.
"""

import argparse

import torch

from microvlm.larimar_memory import pseudo_inverse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    print(f"{'K x C':>10} | {'method':>22} | {'steps':>5} | relative error vs torch.linalg.pinv")
    for slots, dim in ((32, 128), (64, 128), (512, 896)):
        memory = torch.randn(slots, dim) / dim**0.5
        reference = torch.linalg.pinv(memory.double())
        rows = [("cholesky (ridge 1e-4)", "cholesky", 0), ("seed: fixed alpha 5e-4", "seed", 3)]
        rows += [("ben_israel_cohen", "ben_israel_cohen", steps) for steps in (3, 15, 25)]
        for label, method, steps in rows:
            if method == "seed":
                inverse = 5e-4 * memory.T
                for _ in range(steps):
                    inverse = 2 * inverse - inverse @ memory @ inverse
            else:
                inverse = pseudo_inverse(memory, method, steps=steps)
            error = float((inverse.double() - reference).norm() / reference.norm())
            print(f"{slots:>4} x {dim:<4} | {label:>22} | {steps:>5} | {error:.2e}")


if __name__ == "__main__":
    main()
