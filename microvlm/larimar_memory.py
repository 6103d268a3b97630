r"""Larimar episodic memory (Das et al., 2024): a Gaussian, Kanerva-style memory written by Bayesian updates.

The memory is a matrix-normal distribution over M (K slots × C code dims): mean M, and a K×K covariance Σ shared
by the C columns. A code z (C,) is stored at addressing weights w (K,) with wᵀM ≈ z; writing is exact Bayesian
linear regression of the codes on the weights, done one observation at a time (Sherman–Morrison / Kalman).

Keys. A code is a key (its first `key_dim` dims: *which* episode step) followed by a value (the rest: *what* the
step held). Addresses come from the key block alone, so a question that knows only which step it asks about
(its key) reads back the whole code of that step:

* writes address against the prior mean (Larimar's W₀ = Z·M₀†): a step's address depends on its key only, so
  writing the same step again with weight −1 removes it exactly, whatever was written since;
* reads address against the written mean (Larimar's W = Z·M†). With key_dim ≥ K the key block of M has full
  row rank, the solution is unique, and a written key reads back the address it was written at: ẑ = wᵀM ≈ z.

Addressing solves wᵀM_key = k in the least-squares sense, w = k·pinv(M_key), by one of two methods
(`pseudo_inverse`):

* "cholesky" (default): the ridge solution, through the smaller Gram matrix of M (K×K or C×C), one Cholesky per
  batch element; it cannot diverge, and its only error is the ridge's bias.
* "ben_israel_cohen": X₀ = α·Mᵀ, X_{k+1} = 2X_k − X_k·M·X_k with α = 1/‖M‖²_F, which guarantees convergence
  (α < 2/σ²_max); the error shrinks like (1 − α σ²_min)^(2^k), slowly when K/C is large.

Measured by `benchmarks/pinv_error.py` (unit-norm random slots, float32, relative error vs `torch.linalg.pinv`):

    K × C       cholesky   BIC 3 steps   BIC 15 steps   BIC 25 steps   seed (α = 5e-4, 3 steps)
    32 × 128    2.1e-4     8.4e-1        6.1e-7         1.3e-6         99.7%
    512 × 896   7.1e-4     9.9e-1        4.0e-3         1.5e-6         99.8%

Cholesky is the default: below 1e-3 at every size in one step, where 15 iterations leave 4e-3 at the reference
dims.

Every computation runs in float32 with autocast disabled, whatever the caller's dtype; results are cast back.
"""

from typing import NamedTuple

import torch
from torch import nn


class MemoryState(NamedTuple):
    """mean (B, K, C) and covariance (B, K, K) of the memory, float32."""

    mean: torch.Tensor
    cov: torch.Tensor


def _ridge_gram_factor(matrix: torch.Tensor, ridge: float) -> tuple[bool, torch.Tensor]:
    """Cholesky factor of the smaller Gram matrix of `matrix` (..., K, C) plus λI, λ = `ridge`·mean diagonal + 1e-6:
    MMᵀ (K×K) when K ≤ C ("wide"), else MᵀM (C×C). Returns (wide, factor)."""
    rows, columns = matrix.shape[-2:]
    wide = rows <= columns
    gram = matrix @ matrix.transpose(-1, -2) if wide else matrix.transpose(-1, -2) @ matrix
    lam = ridge * gram.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True) + 1e-6  # (..., 1)
    gram.diagonal(dim1=-2, dim2=-1).add_(lam)  # gram + λI, in place: gram is ours
    return wide, torch.linalg.cholesky(gram)


def pseudo_inverse(
    matrix: torch.Tensor, method: str = "cholesky", steps: int = 15, ridge: float = 1e-4
) -> torch.Tensor:
    """pinv of `matrix` (..., K, C) → (..., C, K) (see the module docstring for the two methods)."""
    if method == "cholesky":
        wide, factor = _ridge_gram_factor(matrix, ridge)
        if wide:  # pinv = Mᵀ (MMᵀ + λI)⁻¹ = ((MMᵀ + λI)⁻¹ M)ᵀ
            return torch.cholesky_solve(matrix, factor).transpose(-1, -2)
        return torch.cholesky_solve(matrix.transpose(-1, -2), factor)  # pinv = (MᵀM + λI)⁻¹ Mᵀ
    if method == "ben_israel_cohen":
        alpha = 1.0 / matrix.pow(2).sum((-2, -1), keepdim=True).clamp(min=1e-12)
        inverse = alpha * matrix.transpose(-1, -2)
        for _ in range(steps):
            inverse = 2 * inverse - inverse @ matrix @ inverse
        return inverse
    raise ValueError(f"pseudo_inverse: method must be 'cholesky' or 'ben_israel_cohen', got {method!r}")


def ridge_addresses(matrix: torch.Tensor, queries: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """queries · pinv(matrix) by the "cholesky" method without forming pinv: matrix (B, K, d), queries (B, E, d)
    → (B, E, K). One solve with E right-hand sides instead of K (or d): the same numbers, a fraction of the work."""
    wide, factor = _ridge_gram_factor(matrix, ridge)
    if wide:  # w = q Mᵀ (MMᵀ + λI)⁻¹
        return torch.cholesky_solve(matrix @ queries.transpose(-1, -2), factor).transpose(-1, -2)
    return (matrix @ torch.cholesky_solve(queries.transpose(-1, -2), factor)).transpose(-1, -2)  # q (MᵀM + λI)⁻¹ Mᵀ


class LarimarMemory(nn.Module):
    r"""Episodic memory with a learnable prior N(M0, Σ0), Σ0 = diag(exp(prior_log_variance)).

    Args:
        num_slots: K. code_dim: C, key and value together.
        key_dim: the first `key_dim` dims of a code are its key, which alone addresses (default: the whole code).
            Reads of a written key are exact only when key_dim ≥ K (see the module docstring).
        observation_noise_std: σ_noise, the std of the observation noise of a write (and of a training read).
        pinv_method, pinv_steps, ridge: addressing, see `pseudo_inverse`.
        use_lstm: encode each episode with a bidirectional LSTM (residual, C/2 per direction) before writing,
            so that a step's code can carry its context (order) within the episode.
        addressing_log_variance_init: initial ℓ of the training reads' address noise. Addresses of layer-normed
            codes have norm ≈ 1, so ℓ = −4 (std 0.14 per slot, ≈ 0.8 over 32 slots) drowns the read in noise and
            the LM learns to ignore the memory; −9 (std 0.011) keeps the sampling without that.
    """

    def __init__(
        self,
        num_slots: int,
        code_dim: int,
        key_dim: int | None = None,
        observation_noise_std: float = 0.1,
        pinv_method: str = "cholesky",
        pinv_steps: int = 15,
        ridge: float = 1e-4,
        use_lstm: bool = False,
        addressing_log_variance_init: float = -9.0,
    ):
        super().__init__()
        key_dim = code_dim if key_dim is None else key_dim
        if not 0 < key_dim <= code_dim:
            raise ValueError(f"LarimarMemory: key_dim must be in [1, code_dim={code_dim}], got {key_dim}")
        if use_lstm and code_dim % 2:
            raise ValueError(f"LarimarMemory: use_lstm needs an even code_dim, got {code_dim}")
        self.num_slots, self.code_dim, self.key_dim = num_slots, code_dim, key_dim
        self.observation_noise_std = observation_noise_std
        self.pinv_method, self.pinv_steps, self.ridge = pinv_method, pinv_steps, ridge
        # Unnormalised LM states make the pseudo-inverse diverge: keys and values are layer-normed first, each on
        # its own so that a value never rescales the key that addresses it.
        self.key_norm = nn.LayerNorm(key_dim)
        self.value_norm = nn.LayerNorm(code_dim - key_dim) if key_dim < code_dim else None
        self.prior_mean = nn.Parameter(torch.randn(num_slots, code_dim))
        self.prior_log_variance = nn.Parameter(torch.zeros(num_slots))
        self.addressing_log_variance_init = addressing_log_variance_init
        self.addressing_log_variance = nn.Parameter(torch.full((num_slots,), addressing_log_variance_init))
        self.lstm = nn.LSTM(code_dim, code_dim // 2, bidirectional=True) if use_lstm else None

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _float32(*tensors: torch.Tensor) -> list[torch.Tensor]:
        return [t.float() for t in tensors]

    @staticmethod
    def _layer_norm(z: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        """LayerNorm in float32. It is scale-invariant, so dividing huge inputs by their max first changes nothing
        but keeps the variance from overflowing (fp16 overflow arrives here as ±inf)."""
        z = z / z.abs().amax(-1, keepdim=True).clamp(min=1.0)
        return nn.functional.layer_norm(z, z.shape[-1:], norm.weight.float(), norm.bias.float(), norm.eps)

    def _codes(self, z: torch.Tensor) -> torch.Tensor:
        """Float32 codes (..., C): the key block and the value block layer-normed separately."""
        limit = torch.finfo(torch.float32).max
        z = torch.nan_to_num(z.float(), nan=0.0, posinf=limit, neginf=-limit)
        key = self._layer_norm(z[..., : self.key_dim], self.key_norm)
        if self.value_norm is None:
            return key
        return torch.cat([key, self._layer_norm(z[..., self.key_dim :], self.value_norm)], -1)

    def prior(self, batch_size: int) -> MemoryState:
        """The prior state N(M0, Σ0) for `batch_size` independent memories."""
        with torch.autocast(device_type=self.prior_mean.device.type, enabled=False):
            mean = self.prior_mean.float().unsqueeze(0).expand(batch_size, -1, -1)
            variance = self.prior_log_variance.float().clamp(-10.0, 10.0).exp()
            cov = torch.diag_embed(variance).unsqueeze(0).expand(batch_size, -1, -1)
        return MemoryState(mean, cov)

    def address(self, z: torch.Tensor, state: MemoryState | None = None) -> torch.Tensor:
        """Addressing weights w (E, B, K) with wᵀM_key ≈ key(z) for z (E, B, C): against `state`'s mean (how
        reads address) or, with no state, against the prior (how writes address)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self._address_codes(self._codes(z), state)

    def _address_codes(self, codes: torch.Tensor, state: MemoryState | None) -> torch.Tensor:
        queries = codes[..., : self.key_dim]  # (E, B, d_k)
        if state is None:  # the prior is shared: every query of the batch against one matrix
            keys = self.prior_mean.float()[:, : self.key_dim].unsqueeze(0)  # (1, K, d_k)
            queries = queries.reshape(1, -1, self.key_dim)
        else:
            keys = state.mean.float()[..., : self.key_dim]  # (B, K, d_k)
            queries = queries.transpose(0, 1)  # (B, E, d_k)
        if self.pinv_method == "cholesky":
            addresses = ridge_addresses(keys, queries, self.ridge)
        else:
            addresses = queries @ pseudo_inverse(keys, self.pinv_method, self.pinv_steps, self.ridge)
        if state is None:
            return addresses.view(*codes.shape[:2], -1)
        return addresses.transpose(0, 1)  # (E, B, K)

    # ------------------------------------------------------------------ write / read

    def write(
        self,
        z: torch.Tensor,
        state: MemoryState,
        weight: float | torch.Tensor = 1.0,
        addresses: torch.Tensor | None = None,
    ) -> MemoryState:
        r"""Write an episode z (E, B, C) step by step on top of `state`; returns the posterior state.

        For each step, with code z, addresses w (against the prior, unless `addresses` (E, B, K) are given) and
        sign/weight s (`weight`, a float or (E, B)):

            Δ = z − wᵀM,   d = σ²_noise + s·wᵀΣw,
            M ← M + s·(Σw)Δᵀ / d,   Σ ← Σ − s·(Σw)(Σw)ᵀ / d.

        This is the Sherman–Morrison update of the precision P ← P + s·wwᵀ/σ²_noise (and of the information
        vector Pm ← Pm + s·w zᵀ/σ²_noise), so s = 1 is a Kalman write, s = 0 no write at all, and s = −1 with
        the same addresses — those of the same code, since writes address against the prior — exactly undoes an
        s = 1 write (Larimar's selective forgetting).
        """
        with torch.autocast(device_type=z.device.type, enabled=False):
            codes = self._codes(z)
            if self.lstm is not None:
                codes = codes + self.lstm.float()(codes)[0]
            addresses = self._address_codes(codes, None) if addresses is None else addresses.float()
            steps, batch = codes.shape[:2]
            weights = torch.as_tensor(weight, dtype=torch.float32, device=codes.device).expand(steps, batch)
            mean, cov = self._float32(*state)
            noise = self.observation_noise_std**2
            for step in range(steps):
                w, s = addresses[step], weights[step].unsqueeze(-1)  # (B, K), (B, 1)
                sigma_w = torch.einsum("bkj,bj->bk", cov, w)  # (B, K)
                delta = codes[step] - torch.einsum("bk,bkc->bc", w, mean)  # (B, C)
                denominator = (noise + s * (w * sigma_w).sum(-1, keepdim=True)).clamp(min=1e-6)  # (B, 1)
                gain = (s * sigma_w / denominator).unsqueeze(-1)  # (B, K, 1)
                mean = torch.baddbmm(mean, gain, delta.unsqueeze(1))  # M + gain Δᵀ, one pass over (B, K, C)
                cov = torch.baddbmm(cov, gain, sigma_w.unsqueeze(1), alpha=-1.0)
            cov = 0.5 * (cov + cov.transpose(-1, -2))  # keep it exactly symmetric
        return MemoryState(mean, cov)

    def read(self, z: torch.Tensor, state: MemoryState) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        r"""Read z (E, B, C) → (ẑ (E, B, C) in z's dtype, KL terms). Only z's key block matters.

        ẑ = wᵀM with w = address(z, state). In training, w ~ N(w, diag(exp(ℓ))) with a learned per-slot
        log-variance ℓ (K,), and observation noise N(0, σ²_noise) is added to ẑ; in eval mode reads are
        deterministic.

        KL terms (scalars, float32):

        * ``memory_kl`` = KL(N(M, Σ) ‖ N(M0, Σ0)) of the matrix-normal memory, per column (÷ C) and averaged over
          the batch: ½[tr(Σ0⁻¹Σ) + tr((M−M0)ᵀΣ0⁻¹(M−M0))/C − K + ln|Σ0| − ln|Σ|].
        * ``addressing_kl`` = KL(N(w, diag(exp ℓ)) ‖ N(0, I)) = ½ Σ_k [exp ℓ_k + w_k² − 1 − ℓ_k], summed over the
          K slots and averaged over the E·B reads.
        """
        with torch.autocast(device_type=z.device.type, enabled=False):
            mean, cov = self._float32(*state)
            w = self._address_codes(self._codes(z), MemoryState(mean, cov))  # (E, B, K)
            log_variance = self.addressing_log_variance.float().clamp(-10.0, 4.0)
            if self.training:
                w = w + torch.randn_like(w) * (0.5 * log_variance).exp()
            readout = torch.einsum("ebk,bkc->ebc", w, mean)
            if self.training:
                readout = readout + torch.randn_like(readout) * self.observation_noise_std
            addressing_kl = 0.5 * (log_variance.exp() + w.pow(2) - 1.0 - log_variance).sum(-1).mean()
            kl_terms = {"memory_kl": self._memory_kl(mean, cov), "addressing_kl": addressing_kl}
        return readout.to(z.dtype), kl_terms

    def reconstruction_error(self, z: torch.Tensor, state: MemoryState) -> torch.Tensor:
        r"""Larimar's reconstruction term per step: (E, B) float32 ‖c − wᵀM‖² / C for codes z (E, B, C) written
        into `state`, with c the layer-normed code the memory stores and w = address(z, state) the read's address
        (deterministic: the mean read, no noise). Small when a written step reads back what was written."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            codes = self._codes(z)
            mean = state.mean.float()
            readout = torch.einsum("ebk,bkc->ebc", self._address_codes(codes, MemoryState(mean, state.cov)), mean)
            return (codes - readout).pow(2).mean(-1)

    def _memory_kl(self, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        prior_mean = self.prior_mean.float()
        prior_log_variance = self.prior_log_variance.float().clamp(-10.0, 10.0)
        inverse_prior = (-prior_log_variance).exp()  # diagonal of Σ0⁻¹, (K,)
        k = self.num_slots
        jitter = 1e-8 * torch.eye(k, device=cov.device)  # against round-off only: written directions reach σ²/‖w‖²
        log_det = 2 * torch.linalg.cholesky(cov + jitter).diagonal(dim1=-2, dim2=-1).log().sum(-1)  # (B,)
        trace = (inverse_prior * cov.diagonal(dim1=-2, dim2=-1)).sum(-1)
        mahalanobis = (inverse_prior.unsqueeze(-1) * (mean - prior_mean).pow(2)).sum((-2, -1)) / self.code_dim
        return 0.5 * (trace + mahalanobis - k + prior_log_variance.sum() - log_det).mean()

    def extra_repr(self) -> str:
        return f"num_slots={self.num_slots}, code_dim={self.code_dim}, key_dim={self.key_dim}, pinv={self.pinv_method}"


__all__ = ["LarimarMemory", "MemoryState", "pseudo_inverse", "ridge_addresses"]
