"""Embedding, attention, memory and retrieval statistics reported by evaluation.

* Gaussianity of embeddings: LeJEPA's sliced Epps–Pulley test (Balestriero & LeCun, 2025, "LeJEPA: Provable and
  Scalable Self-Supervised Learning Without the Heuristics"), always shown beside its Monte-Carlo null
  (`sliced_epps_pulley`, `epps_pulley_slices`, `epps_pulley_null`, `gaussianity_report`).
* `attention_stats`: entropy, sparsity and Gini coefficient of attention rows (e.g. text queries over the image
  prefix keys).
* `slot_utilisation`: how evenly the episodic memory's addressing weights use its slots.
* `retrieval_recall` / `recall_from_similarity`: image→text and text→image recall@k.
* `linear_probe`: held-out accuracy of a closed-form ridge classifier on features (what an encoder makes linearly
  readable, e.g. the shape of the drawn objects from pooled vision features).

Everything is computed in float64 and returns plain Python numbers, so results go straight into JSON.
"""

import math

import torch

EP_T_MAX = 3.0
EP_NUM_POINTS = 17


# ---------------------------------------------------------------------------------------------- Epps–Pulley


def unit_directions(dim: int, num_slices: int = 256, seed: int = 0) -> torch.Tensor:
    """(D, S) random unit directions (columns), drawn from a CPU generator seeded with `seed`, so every checkpoint
    and the Monte-Carlo null are tested along the same slices."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(dim, num_slices, generator=generator, dtype=torch.float64)
    return directions / directions.norm(dim=0, keepdim=True)


def epps_pulley(projections: torch.Tensor, t_max: float = EP_T_MAX, num_points: int = EP_NUM_POINTS) -> torch.Tensor:
    r"""Epps–Pulley statistic of each column of `projections` (N, S) against the standard normal N(0, 1):

        T = N · ∫_{−t_max}^{t_max} |φ_N(t) − e^{−t²/2}|² w(t) dt,   φ_N(t) = (1/N) Σ_j e^{i t x_j},   w(t) = e^{−t²/2},

    where e^{−t²/2} is N(0, 1)'s characteristic function and w the Gaussian window. The integrand is even in t
    (φ_N(−t) is the conjugate of φ_N(t)), so T is twice the trapezoid rule over `num_points` equally spaced points
    of [0, t_max] (LeJEPA's 17 points on [0, 3] by default). For N(0, 1) samples E|φ_N(t) − φ(t)|² =
    (1 − φ(t)²)/N, so E[T] = ∫ (1 − e^{−t²}) w(t) dt ≈ 1.05 whatever N. Returns (S,) float64.
    """
    x = projections.double()
    n = x.shape[0]
    if n == 0:
        raise ValueError("the Epps–Pulley statistic needs at least one sample")
    t = torch.linspace(0.0, t_max, num_points, dtype=torch.float64).view(-1, 1, 1)  # (P, 1, 1)
    real = torch.zeros(num_points, x.shape[1], dtype=torch.float64)
    imaginary = torch.zeros_like(real)
    # Samples in chunks of ≈ 2²² angles: few large ops, with memory bounded whatever N is.
    for chunk in x.split(max(1, 2**22 // (num_points * max(x.shape[1], 1)))):
        angles = t * chunk.unsqueeze(0)  # (P, n_chunk, S)
        real += angles.cos().sum(1)
        imaginary += angles.sin().sum(1)
    gaussian = torch.exp(-0.5 * t.view(-1, 1) ** 2)  # φ(t) of N(0, 1), and also the window w(t)
    integrand = ((real / n - gaussian) ** 2 + (imaginary / n) ** 2) * gaussian  # (P, S)
    return n * 2.0 * torch.trapezoid(integrand, t.view(-1), dim=0)


def centre_and_scale(embeddings: torch.Tensor) -> torch.Tensor:
    """X (N, D) centred and divided by one scalar s = ‖X − mean‖_F / √(N·D), so the mean variance along a
    random unit direction is exactly 1 (E_u[uᵀΣu] = tr Σ / D). Being a single scalar, it keeps anisotropy,
    collapse, clusters and heavy tails visible to the test; it only removes location and overall scale."""
    x = embeddings.double()
    x = x - x.mean(0, keepdim=True)
    scale = x.norm() / math.sqrt(x.numel())
    return x / scale.clamp(min=1e-12)


def epps_pulley_slices(
    embeddings: torch.Tensor,
    num_slices: int = 256,
    seed: int = 0,
    directions: torch.Tensor | None = None,
    standardise: bool = True,
) -> torch.Tensor:
    """Epps–Pulley statistic (S,) of X (N, D) projected on each of S unit directions.

    `directions` (D, S) overrides `num_slices`/`seed` (default: `unit_directions(D, num_slices, seed)`).
    `standardise`: the paper's SIGReg tests the raw projections against N(0, 1) — as a regulariser it must
    also fix location and scale. Evaluated embeddings are not trained for that (the alignment head's are unit
    norm, so each coordinate has variance ≈ 1/D), and the raw test would then measure mostly scale. By default
    X is therefore centred and divided by one scalar (`centre_and_scale`) and the test measures the shape:
    Gaussianity and isotropy. `standardise=False` is the paper's test of N(0, I) itself.
    """
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {tuple(embeddings.shape)}")
    x = centre_and_scale(embeddings) if standardise else embeddings.double()
    if directions is None:
        directions = unit_directions(x.shape[1], num_slices, seed)
    elif directions.shape[0] != x.shape[1]:
        raise ValueError(f"directions are {tuple(directions.shape)} but the embeddings have D = {x.shape[1]}")
    return epps_pulley(x @ directions.double())


def sliced_epps_pulley(
    embeddings: torch.Tensor,
    num_slices: int = 256,
    seed: int = 0,
    directions: torch.Tensor | None = None,
    standardise: bool = True,
) -> float:
    """Mean over slices of `epps_pulley_slices` (same arguments): LeJEPA's sliced statistic of X (N, D)."""
    return float(epps_pulley_slices(embeddings, num_slices, seed, directions, standardise).mean())


def _null_statistics(
    n: int, dim: int, directions: torch.Tensor, repeats: int, seed: int, standardise: bool
) -> torch.Tensor:
    """(repeats,) sliced statistics of standard Gaussian samples (n, dim), drawn from a generator seeded with
    `seed + 1` (the directions use `seed`)."""
    if repeats < 1:
        raise ValueError(f"the null needs at least one repeat, got {repeats}")
    generator = torch.Generator().manual_seed(seed + 1)
    return torch.tensor(
        [
            sliced_epps_pulley(
                torch.randn(n, dim, generator=generator, dtype=torch.float64),
                directions=directions,
                standardise=standardise,
            )
            for _ in range(repeats)
        ],
        dtype=torch.float64,
    )


def _summarise_null(values: torch.Tensor) -> dict[str, float | int]:
    """Mean, std, 95% quantile (linear interpolation) and count of null statistics."""
    return {
        "mean": float(values.mean()),
        "std": float(values.std()) if len(values) > 1 else 0.0,
        "q95": float(values.quantile(0.95)),
        "repeats": len(values),
    }


def epps_pulley_null(
    n: int,
    dim: int,
    num_slices: int = 256,
    repeats: int = 50,
    seed: int = 0,
    directions: torch.Tensor | None = None,
    standardise: bool = True,
) -> dict[str, float | int]:
    """Monte-Carlo null of `sliced_epps_pulley`: the statistic of `repeats` standard Gaussian samples (n, dim)
    through the same directions (from `seed`, or `directions`) and the same standardisation, the samples from
    a generator seeded with `seed + 1`. Returns mean, std, 95% quantile (linear interpolation) and repeats."""
    if directions is None:
        directions = unit_directions(dim, num_slices, seed)
    return _summarise_null(_null_statistics(n, dim, directions, repeats, seed, standardise))


def gaussianity_report(
    embeddings: torch.Tensor, num_slices: int = 256, seed: int = 0, repeats: int = 50, standardise: bool = True
) -> dict:
    """The sliced statistic of X (N, D) beside its null, for a report: statistic (mean over slices),
    slice_max (the worst direction), null {mean, std, q95, repeats} as `epps_pulley_null`, p_value =
    (1 + #{null ≥ statistic}) / (1 + repeats) from the same null draws, n, dim, num_slices and standardise."""
    n, dim = embeddings.shape
    directions = unit_directions(dim, num_slices, seed)
    slices = epps_pulley_slices(embeddings, directions=directions, standardise=standardise)
    statistic = float(slices.mean())
    null = _null_statistics(n, dim, directions, repeats, seed, standardise)
    return {
        "statistic": statistic,
        "slice_max": float(slices.max()),
        "null": _summarise_null(null),
        "p_value": (1 + int((null >= statistic).sum())) / (1 + repeats),
        "n": n,
        "dim": dim,
        "num_slices": num_slices,
        "standardise": standardise,
    }


# ---------------------------------------------------------------------------------------------- attention


def attention_stats(attention: torch.Tensor, normalise: bool = True) -> dict[str, float]:
    """Statistics of attention rows (..., Q, K) over K ≥ 2 keys, averaged over all rows.

    With `normalise` (default) each row is divided by its sum first, so a slice of the key axis (e.g. the
    image-prefix columns of full attention rows) is described as the distribution of attention within it, and
    `mass` reports the mean row sum before that (the share of attention the slice receives). With
    `normalise=False` rows must already sum to 1 (±1e-3). For a row p:

    * entropy H = −Σ_k p_k log p_k (nats; 0 · log 0 = 0): log K for uniform rows, 0 for one-hot rows;
    * normalised_entropy H / log K ∈ [0, 1];
    * sparsity: the fraction of weights below 1/(10K), a tenth of the uniform weight (one-hot: (K − 1)/K);
    * gini: Σ_i (2i − K − 1) p_(i) / (K Σ p) over the ascending sorted weights p_(1) ≤ … ≤ p_(K): 0 for
      uniform rows, (K − 1)/K for one-hot rows.
    """
    k = attention.shape[-1]
    if k < 2:
        raise ValueError(f"attention statistics need at least 2 keys, got {k}")
    rows = attention.detach().double().reshape(-1, k)
    if rows.numel() == 0 or (rows < 0).any():
        raise ValueError("attention must have at least one row and no negative weights")
    mass = rows.sum(-1)
    if normalise:
        if (mass <= 0).any():
            raise ValueError("some attention rows have zero mass on these keys, so they cannot be normalised")
        rows = rows / mass.unsqueeze(-1)
    elif not torch.allclose(mass, torch.ones_like(mass), atol=1e-3):
        raise ValueError("attention rows do not sum to 1; pass normalise=True to describe a slice of the keys")
    entropy = -torch.special.xlogy(rows, rows).sum(-1)
    ordered = rows.sort(-1).values
    ranks = torch.arange(1, k + 1, dtype=torch.float64)
    gini = ((2 * ranks - k - 1) * ordered).sum(-1) / (k * ordered.sum(-1))
    return {
        "entropy": float(entropy.mean()),
        "normalised_entropy": float((entropy / math.log(k)).mean()),
        "sparsity": float((rows < 1 / (10 * k)).double().mean()),
        "gini": float(gini.mean()),
        "mass": float(mass.mean()),
        "num_keys": k,
        "rows": rows.shape[0],
    }


# ---------------------------------------------------------------------------------------------- memory


def slot_utilisation(addresses: torch.Tensor, threshold: float = 0.1) -> dict[str, float]:
    """How the memory's addressing weights (E, B, K) — E written or read items, B batch rows, K slots; any
    leading shape works — spread over the slots. Larimar's weights can be negative, so usage is magnitude:

    * u_k = mean over items and rows of |w_k|, share s_k = u_k / Σ_j u_j;
    * active_fraction: fraction of slots with s_k > threshold / K (above `threshold` × the uniform share);
    * usage_entropy H = −Σ_k s_k log s_k (nats), normalised_usage_entropy H / log K;
    * effective_slots exp(H): K for uniform usage, 1 when a single slot is used.
    """
    k = addresses.shape[-1]
    usage = addresses.detach().double().abs().reshape(-1, k).mean(0)
    total = usage.sum()
    if not total > 0:
        raise ValueError("the addressing weights are all zero (or empty): slot usage is undefined")
    share = usage / total
    entropy = float(-torch.special.xlogy(share, share).sum())
    return {
        "active_fraction": float((share > threshold / k).double().mean()),
        "usage_entropy": entropy,
        "normalised_usage_entropy": entropy / math.log(k) if k > 1 else 0.0,
        "effective_slots": math.exp(entropy),
        "slots": k,
    }


# ---------------------------------------------------------------------------------------------- retrieval


def _expected_hits(similarity: torch.Tensor, correct: torch.Tensor, k: int) -> torch.Tensor:
    """(Q,) probability that a correct candidate is among the top k of each query row of `similarity` (Q, C),
    with ties broken uniformly at random. For a row: s* = best correct score, G = wrong candidates scoring
    above s*, E wrong and c correct candidates tied at s*; with m = k − G free places, P(hit) = 0 if m ≤ 0,
    1 if m > E, else 1 − C(E, m) / C(E + c, m) (no correct one among the first m of the E + c tied)."""
    sim = similarity.double()
    best = sim.masked_fill(~correct, -math.inf).max(-1, keepdim=True).values
    above = ((sim > best) & ~correct).sum(-1).double()
    tied_wrong = ((sim == best) & ~correct).sum(-1).double()
    tied_right = ((sim == best) & correct).sum(-1).double()
    free = (k - above).clamp(min=0)
    m = torch.minimum(free, tied_wrong)  # only used where free ≤ tied_wrong
    log_miss = (
        torch.lgamma(tied_wrong + 1)
        - torch.lgamma(tied_wrong - m + 1)
        - torch.lgamma(tied_wrong + tied_right + 1)
        + torch.lgamma(tied_wrong + tied_right - m + 1)
    )
    hit = 1 - log_miss.exp()
    return torch.where(free <= 0, 0.0, torch.where(free > tied_wrong, 1.0, hit))


def recall_from_similarity(
    similarity: torch.Tensor, correct: torch.Tensor | None = None, ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """Recall@k both ways from `similarity` (N images, N texts). `correct` (N, N) bool marks which texts are
    right for each image (e.g. identical captions); the diagonal always is. Ties count at their expected
    value under random tie-breaking, so collapsed (all-equal) embeddings score chance, not 1 or 0."""
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be square (N images, N texts), got {tuple(similarity.shape)}")
    match = torch.eye(similarity.shape[0], dtype=torch.bool)
    if correct is not None:
        if correct.shape != similarity.shape or correct.dtype != torch.bool:
            raise ValueError(f"correct must be a bool tensor of shape {tuple(similarity.shape)}")
        match = match | correct
    results = {}
    for k in ks:
        results[f"image_to_text_r@{k}"] = float(_expected_hits(similarity, match, k).mean())
        results[f"text_to_image_r@{k}"] = float(_expected_hits(similarity.T, match.T, k).mean())
    return results


def retrieval_recall(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    ks: tuple[int, ...] = (1, 5),
    correct: torch.Tensor | None = None,
) -> dict[str, float]:
    """Image→text and text→image recall@k of paired embeddings (N, D) each, image i matching text i, ranked by
    cosine similarity; `correct` and ties as in `recall_from_similarity`. Keys: image_to_text_r@k and
    text_to_image_r@k for each k."""
    for name, embeds in (("image_embeds", image_embeds), ("text_embeds", text_embeds)):
        if embeds.dim() != 2 or not embeds.is_floating_point():
            raise TypeError(
                f"{name} must be floating-point (N, D) embeddings; for a similarity matrix use recall_from_similarity"
            )
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"paired embeddings differ in shape: {tuple(image_embeds.shape)} vs {tuple(text_embeds.shape)}"
        )
    images = torch.nn.functional.normalize(image_embeds.detach().double(), dim=-1)
    texts = torch.nn.functional.normalize(text_embeds.detach().double(), dim=-1)
    return recall_from_similarity(images @ texts.T, correct, ks)


# ---------------------------------------------------------------------------------------------- linear probe


def linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, ridge: float = 0.1) -> float:
    r"""Accuracy of a ridge-regression classifier trained on the first half of the rows, tested on the second.

    features: (N, F); labels: (N,) integers in [0, num_classes). Features are standardised with the first half's
    statistics and get a constant column; the one-hot targets Y are fitted in closed form in the dual,
    W = Xᵀ (X Xᵀ + λ I)⁻¹ Y with λ = ridge · tr(X Xᵀ) / n (scale-free, and exact when N/2 < F), and a test row's
    class is argmax x W. Returns the fraction of the second half classified right.
    """
    if features.shape[0] != labels.shape[0] or features.shape[0] < 2:
        raise ValueError(
            f"linear_probe needs ≥ 2 rows, one label each: got {features.shape[0]} rows, {labels.shape[0]} labels"
        )
    x, y = features.double(), labels.long()
    half = x.shape[0] // 2
    mean, std = x[:half].mean(0), x[:half].std(0).clamp(min=1e-8)
    x = torch.cat([(x - mean) / std, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    train, test = x[:half], x[half:]
    gram = train @ train.T
    regulariser = ridge * gram.diagonal().mean() * torch.eye(half, dtype=x.dtype)
    targets = torch.nn.functional.one_hot(y[:half], num_classes).double()
    weights = train.T @ torch.linalg.solve(gram + regulariser, targets)
    return float(((test @ weights).argmax(1) == y[half:]).double().mean())
