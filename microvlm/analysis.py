"""Embedding, attention and memory statistics reported by evaluation.

* `sliced_epps_pulley`: LeJEPA's (Balestriero & LeCun, 2025) sliced Epps–Pulley test of isotropic Gaussianity
  for embeddings X (N, D), always reported beside `epps_pulley_null`, its Monte-Carlo null for the same N, D.
* `attention_stats`: entropy and sparsity of attention rows.
* `slot_utilisation`: how many memory slots the addressing weights use.
* `retrieval_recall`: image→text and text→image recall@k from similarity scores.
"""

import math

import torch

INTEGRATION_POINTS = torch.linspace(0.0, 3.0, 17)


def unit_directions(dim: int, num_slices: int = 256, seed: int = 0) -> torch.Tensor:
    """(D, S) random unit directions, fixed by `seed` so checkpoints are compared along the same slices."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(dim, num_slices, generator=generator, dtype=torch.float64)
    return directions / directions.norm(dim=0, keepdim=True)


def epps_pulley(projections: torch.Tensor) -> torch.Tensor:
    r"""Epps–Pulley statistic of each column of `projections` (N, S) against N(0, 1):

        T = N · ∫_{−3}^{3} |φ_N(t) − e^{−t²/2}|² · e^{−t²/2} dt,   φ_N(t) = (1/N) Σ_j e^{i t x_j},

    computed as twice the trapezoid integral over the 17 points of [0, 3] (the integrand is even). Returns (S,).
    """
    n = projections.shape[0]
    t = INTEGRATION_POINTS.to(projections).view(-1, 1, 1)  # (P, 1, 1)
    angles = t * projections.unsqueeze(0)  # (P, N, S)
    real, imaginary = angles.cos().mean(1), angles.sin().mean(1)  # (P, S)
    target = torch.exp(-0.5 * t.view(-1, 1) ** 2)
    integrand = ((real - target) ** 2 + imaginary**2) * target  # weight w(t) = e^{−t²/2} = the target itself
    return n * 2 * torch.trapezoid(integrand, INTEGRATION_POINTS.to(projections), dim=0)


def standardise(embeddings: torch.Tensor) -> torch.Tensor:
    """Centre X and divide by one scalar (its mean per-dimension std): the test then measures shape — Gaussianity
    and isotropy — not scale."""
    x = embeddings.double()
    x = x - x.mean(0, keepdim=True)
    return x / x.std(0).mean().clamp(min=1e-12)


def sliced_epps_pulley(embeddings: torch.Tensor, num_slices: int = 256, seed: int = 0) -> float:
    """Mean over `num_slices` fixed random directions of the Epps–Pulley statistic of standardised X (N, D)."""
    x = standardise(embeddings)
    return float(epps_pulley(x @ unit_directions(x.shape[1], num_slices, seed)).mean())


def epps_pulley_null(n: int, dim: int, num_slices: int = 256, repeats: int = 20, seed: int = 0) -> dict[str, float]:
    """The statistic on `repeats` Gaussian samples (n, dim), standardised the same way: mean and 95% quantile."""
    generator = torch.Generator().manual_seed(seed + 1)
    values = torch.tensor([
        sliced_epps_pulley(torch.randn(n, dim, generator=generator, dtype=torch.float64), num_slices, seed)
        for _ in range(repeats)
    ])
    return {"mean": float(values.mean()), "q95": float(values.quantile(0.95))}


def attention_stats(attention: torch.Tensor) -> dict[str, float]:
    """For rows (..., K) of attention weights summing to 1: mean entropy (nats), entropy ÷ log K, the fraction
    of weights below 1/(10K) (sparsity), and the mean Gini coefficient of the rows."""
    k = attention.shape[-1]
    p = attention.double().clamp(min=0)
    p = p / p.sum(-1, keepdim=True).clamp(min=1e-12)
    entropy = -(p * p.clamp(min=1e-12).log()).sum(-1)
    ordered = p.sort(-1).values
    # Gini = 1 − 2·(area under the Lorenz curve), trapezoid over the K sorted weights.
    gini = 1 - 2 * (ordered.cumsum(-1).sum(-1) - 0.5 * ordered.sum(-1)) / (k * ordered.sum(-1).clamp(min=1e-12))
    return {
        "entropy": float(entropy.mean()),
        "normalised_entropy": float((entropy / math.log(k)).mean()) if k > 1 else 0.0,
        "sparsity": float((p < 1 / (10 * k)).double().mean()),
        "gini": float(gini.mean()),
    }


def slot_utilisation(addresses: torch.Tensor, threshold: float = 0.1) -> dict[str, float]:
    """For addressing weights (E, B, K): the fraction of slots whose mean |w| exceeds `threshold` × the largest
    slot's, the entropy of the normalised slot usage, and the effective number of slots exp(entropy)."""
    usage = addresses.detach().double().abs().mean((0, 1))
    share = usage / usage.sum().clamp(min=1e-12)
    entropy = float(-(share * share.clamp(min=1e-12).log()).sum())
    return {
        "active_fraction": float((usage > threshold * usage.max()).double().mean()),
        "usage_entropy": entropy,
        "effective_slots": math.exp(entropy),
        "slots": addresses.shape[-1],
    }


def retrieval_recall(similarity: torch.Tensor, correct: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Recall@k both ways from `similarity` (N images, N texts) and `correct` (N, N) booleans (which texts count
    as right for each image; the diagonal at least — identical captions are equally right)."""
    results = {}
    for k in ks:
        top_texts = similarity.topk(k, dim=1).indices  # (N, k)
        top_images = similarity.topk(k, dim=0).indices.T  # (N texts, k)
        results[f"image_to_text_r@{k}"] = float(correct.gather(1, top_texts).any(1).double().mean())
        results[f"text_to_image_r@{k}"] = float(correct.T.gather(1, top_images).any(1).double().mean())
    return results
