"""A native CPU kernel for `PackedBitLinear`: ternary weights × per-token int8 activations, in integers.

For activations x (M, K) and the packed weight of an (N, K) ternary layer (`bitnet.pack_ternary`'s layout: byte
(j, c) holds the codes t + 1 ∈ {0, 1, 2} of rows j, j + R, j + 2R, j + 3R of column c, R = ceil(N / 4)):

    a_m = max(max_c |x_mc|, eps),  q_mc = clamp(round(x_mc · Q / a_m), −Q − 1, Q)   (`quantise_activations`)
    y_mr = (Σ_c t_rc q_mc) · (a_m / Q) / g + b_r,   Σ_c t_rc q_mc = Σ_c (t_rc + 1) q_mc − Σ_c q_mc

so the inner loop multiplies the stored unsigned codes by signed int8 activations (AVX2 `vpmaddubsw`, 32 products
per instruction, summed in int16 for 32 steps and widened with `vpmaddwd`) and one row sum per token corrects for
the +1. The integer dot product is exact; the output differs from the float reference (unpacked W_q times the
dequantised x_q, `PackedBitLinear`'s PyTorch path) by float rounding only. Threads (`at::parallel_for`, torch's
intra-op pool) split the packed rows; tokens are taken in pairs so that each byte of weights is unpacked once per
two tokens, and in blocks of 64 so that a block's activations stay in cache. Both ops take x (..., K) of any float
dtype and return (..., N) in x's dtype (the reshape and casts happen in C++, not in per-call Python), and keep the
int8 activations in per-thread buffers reused across calls.

The same extension holds `packed_linear`, the packed LM head, the llama.cpp Q4 × Q8 way: for W stored as
`packed_weights.Int8Weight` (int8 codes w, one scale s_r per row) or `Int4Weight` (codes w + 8 ∈ [1, 15], one
float16 scale s_g per group of G elements), the activations are quantised per token as above (Q = 127) and

    y_mr = (a_m / Q) · Σ_g s_g Σ_{c ∈ g} w_rc q_mc      (int8: one group, the row)

with the inner sums in integers: int4 multiplies the unsigned stored codes by the signed activations
(`vpmaddubsw`, the low and high nibbles of 32 bytes against activations reordered to match) and subtracts
8 · Σ q per 64-element chunk; int8 multiplies |q| by sign(w, q). Each group's integer sum is scaled in float32
(int4) or the row's (int8); 4 tokens per pass over a row, threads over vocabulary rows. So the 136M-weight head of
"microvlm-v" is read at 4 or 8 bits per weight and never dequantised, and its output equals the float reference
(dequantised W times the dequantised int8 activations, `packed_weights.quantised_linear`) up to float rounding.

The C++ source is embedded below so that it travels with the remote code of an exported folder (transformers
copies the `.py` files a model's code imports, nothing else). It is compiled on first use through
`torch.utils.cpp_extension.load_inline` (g++ and ninja; `pip install ninja` provides the latter) into torch's
extension cache (`$TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`), with `-mavx2 -mfma -mf16c` where
torch reports AVX2 and as portable scalar C++ elsewhere (or everywhere with `MICROVLM_TERNARY_KERNEL=portable`).
When it cannot be built, or `MICROVLM_TERNARY_KERNEL=0` is set, callers get `None` from `load_ternary_kernel` (one
warning) and keep the PyTorch path: same results up to float rounding.

This module is shipped as Hugging Face remote code: it depends on torch only.
"""

import hashlib
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch


logger = logging.getLogger(__name__)

ENVIRONMENT_SWITCH = "MICROVLM_TERNARY_KERNEL"

KERNEL_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr float kEps = 1e-5f;      // bitnet.EPS
constexpr int64_t kTokenBlock = 64;  // tokens whose int8 activations share the cache while rows go by

// x (..., K), any floating dtype → contiguous float32 (tokens, K): the tokens as the kernels read them.
at::Tensor token_matrix(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && at::isFloatingType(x.scalar_type()) && x.dim() >= 1, op,
              ": x must be a floating-point CPU tensor (..., in_features)");
  return x.reshape({-1, x.size(-1)}).to(at::kFloat).contiguous();
}

// y (tokens, N) float32 → (..., N) in x's shape and dtype.
at::Tensor shaped_like(const at::Tensor& y, const at::Tensor& x) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = y.size(1);
  return y.view(shape).to(x.scalar_type());
}

// Per-token int8 activations: codes q (tokens, cols), absmax a and Σ_c q per token. Buffers kept by the calling
// thread and reused, so a decode step allocates nothing for them.
struct QuantisedTokens {
  std::vector<int8_t> codes;
  std::vector<float> absmax;
  std::vector<int32_t> sums;
};

// Per-token absmax quantisation with bitnet.quantise_activations' float32 arithmetic: q = clamp(round(x * Q / a)).
const QuantisedTokens& quantise_tokens(const float* x, int64_t tokens, int64_t cols, int64_t levels) {
  thread_local QuantisedTokens buffers;
  buffers.codes.resize(tokens * cols);
  buffers.absmax.resize(tokens);
  buffers.sums.resize(tokens);
  int8_t* q = buffers.codes.data();
  float* absmax = buffers.absmax.data();
  int32_t* sums = buffers.sums.data();
  const int64_t grain = std::max<int64_t>(2, 65536 / std::max<int64_t>(cols, 1));  // one token runs inline
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* row = x + m * cols;
      float a = 0.f;
      for (int64_t c = 0; c < cols; ++c) a = std::max(a, std::fabs(row[c]));
      a = std::max(a, kEps);
      const float level = static_cast<float>(levels);
      int32_t sum = 0;
      for (int64_t c = 0; c < cols; ++c) {
        const float v = std::nearbyint(row[c] * level / a);
        const int32_t code = static_cast<int32_t>(std::min(std::max(v, -level - 1.f), level));
        q[m * cols + c] = static_cast<int8_t>(code);
        sum += code;
      }
      absmax[m] = a;
      sums[m] = sum;
    }
  });
  return buffers;
}

#if defined(__AVX2__)
inline int32_t horizontal_sum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}
#endif

// dots[t][k] = sum_c code_k(w[c]) * q[t * cols + c] for T tokens; code_k = bits 2k..2k+1 of byte w[c].
template <int T>
void code_dots(const uint8_t* w, const int8_t* q, int64_t cols, int32_t dots[T][4]) {
  int64_t c = 0;
  for (int t = 0; t < T; ++t)
    for (int k = 0; k < 4; ++k) dots[t][k] = 0;
#if defined(__AVX2__)
  const __m256i mask = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  // An int16 lane gains at most 2 * 3 * 128 = 768 per step: 32 steps stay below 32767.
  constexpr int64_t kBlock = 32 * 32;
  const int64_t vector_end = cols / 32 * 32;
  __m256i wide[T][4];
  for (int t = 0; t < T; ++t)
    for (int k = 0; k < 4; ++k) wide[t][k] = _mm256_setzero_si256();
  while (c < vector_end) {
    const int64_t block_end = std::min(vector_end, c + kBlock);
    __m256i part[T][4];
    for (int t = 0; t < T; ++t)
      for (int k = 0; k < 4; ++k) part[t][k] = _mm256_setzero_si256();
    for (; c < block_end; c += 32) {
      const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c));
      const __m256i codes[4] = {
          _mm256_and_si256(bytes, mask), _mm256_and_si256(_mm256_srli_epi16(bytes, 2), mask),
          _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask), _mm256_and_si256(_mm256_srli_epi16(bytes, 6), mask)};
      for (int t = 0; t < T; ++t) {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + t * cols + c));
        for (int k = 0; k < 4; ++k) part[t][k] = _mm256_add_epi16(part[t][k], _mm256_maddubs_epi16(codes[k], a));
      }
    }
    for (int t = 0; t < T; ++t)
      for (int k = 0; k < 4; ++k) wide[t][k] = _mm256_add_epi32(wide[t][k], _mm256_madd_epi16(part[t][k], ones));
  }
  for (int t = 0; t < T; ++t)
    for (int k = 0; k < 4; ++k) dots[t][k] = horizontal_sum(wide[t][k]);
#endif
  for (; c < cols; ++c) {
    const int32_t byte = w[c];
    for (int k = 0; k < 4; ++k) {
      const int32_t code = (byte >> (2 * k)) & 3;
      for (int t = 0; t < T; ++t) dots[t][k] += code * q[t * cols + c];
    }
  }
}

// x (..., K) → y (..., N) in x's dtype, for the (N, K) ternary layer packed in `packed` (module docstring).
at::Tensor ternary_linear(const at::Tensor& input, const at::Tensor& packed, int64_t out_features,
                          const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias, int64_t bits) {
  const at::Tensor x = token_matrix(input, "ternary_linear");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous() &&
                  packed.size(0) == (out_features + 3) / 4 && packed.size(1) == x.size(1),
              "ternary_linear: packed must be contiguous uint8 (ceil(out_features / 4), in_features)");
  TORCH_CHECK(bits >= 2 && bits <= 8, "ternary_linear: activation bits must lie in [2, 8]");
  TORCH_CHECK(weight_scale.numel() == 1, "ternary_linear: weight_scale must hold one value");
  const int64_t tokens = x.size(0), cols = x.size(1), packed_rows = packed.size(0);
  const int64_t levels = (int64_t{1} << (bits - 1)) - 1;
  const QuantisedTokens& quantised = quantise_tokens(x.data_ptr<float>(), tokens, cols, levels);
  const float inverse_scale = weight_scale.to(at::kFloat).data_ptr<float>()[0];
  auto out = at::empty({tokens, out_features}, x.options());
  float* y = out.data_ptr<float>();
  const at::Tensor bias32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* b = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const int8_t* qs = quantised.codes.data();
  const float* a = quantised.absmax.data();
  const int32_t* s = quantised.sums.data();
  auto store = [&](int64_t j, int64_t m, const int32_t dots[4]) {
    const float token_scale = a[m] / static_cast<float>(levels);
    for (int k = 0; k < 4; ++k) {
      const int64_t r = j + k * packed_rows;
      if (r < out_features)
        y[m * out_features + r] = static_cast<float>(dots[k] - s[m]) * token_scale / inverse_scale + (b ? b[r] : 0.f);
    }
  };
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, packed_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t block = 0; block < tokens; block += kTokenBlock) {
      const int64_t block_end = std::min(tokens, block + kTokenBlock);
      for (int64_t j = begin; j < end; ++j) {
        const uint8_t* row = w + j * cols;
        int64_t m = block;
        for (; m + 2 <= block_end; m += 2) {
          int32_t dots[2][4];
          code_dots<2>(row, qs + m * cols, cols, dots);
          store(j, m, dots[0]);
          store(j, m + 1, dots[1]);
        }
        for (; m < block_end; ++m) {
          int32_t dots[1][4];
          code_dots<1>(row, qs + m * cols, cols, dots);
          store(j, m, dots[0]);
        }
      }
    }
  });
  return shaped_like(out, input);
}

// ---- int8 / int4 weights × int8 activations (the packed LM head), packed_weights.Int8Weight / Int4Weight ----

// A (rows, cols) matrix as packed_weights stores it: bits 8: int8 codes (rows, cols) and float32 row scales;
// bits 4: the flattened matrix two codes per byte (element 2i in the low nibble, code q + 8) and one float16
// scale per `group` consecutive elements.
struct PackedMatrix {
  int64_t cols, bits, group;
  const int8_t* int8_codes;
  const float* row_scales;
  const uint8_t* int4_codes;
  const at::Half* group_scales;

  // Whole 64-element chunks of a row lie in one group: the vector path applies.
  bool chunked() const { return cols % 64 == 0 && (bits == 8 || group % 64 == 0); }
};

// Per-token int8 activations as the head's dot products read them: codes (tokens, cols); on the int4 vector path
// each 64-element chunk's even elements then its odd ones (the order of the low and high nibbles), and one int32
// vector per chunk holding 8 · Σ q over the chunk in lane 0 (zeros elsewhere), the correction for the codes'
// offset of 8.
struct HeadActivations {
  const int8_t* codes;
  const int32_t* offsets;
  int64_t chunks;
};

// The portable dot product of row r with T tokens' int8 codes q: Σ_g s_g Σ_{c ∈ g} w_c q_c, with w_c = q for int8
// (one scale per row) and code − 8 for int4 (groups of the flattened matrix, which may span rows).
template <int T>
void scalar_head_dots(const PackedMatrix& w, int64_t r, const int8_t* q, float dots[T]) {
  for (int t = 0; t < T; ++t) dots[t] = 0.f;
  if (w.bits == 8) {
    int32_t sums[T] = {};
    const int8_t* row = w.int8_codes + r * w.cols;
    for (int64_t c = 0; c < w.cols; ++c)
      for (int t = 0; t < T; ++t) sums[t] += static_cast<int32_t>(row[c]) * q[t * w.cols + c];
    for (int t = 0; t < T; ++t) dots[t] = static_cast<float>(sums[t]) * w.row_scales[r];
    return;
  }
  int64_t c = 0;
  while (c < w.cols) {  // one group (or the part of it in this row) at a time
    const int64_t e = r * w.cols + c, group_end = std::min(w.cols, c + w.group - e % w.group);
    int32_t sums[T] = {};
    for (; c < group_end; ++c) {
      const int64_t element = r * w.cols + c;
      const uint8_t byte = w.int4_codes[element >> 1];
      const int32_t code = ((element & 1) ? (byte >> 4) : (byte & 15)) - 8;
      for (int t = 0; t < T; ++t) sums[t] += code * q[t * w.cols + c];
    }
    const float scale = static_cast<float>(w.group_scales[e / w.group]);
    for (int t = 0; t < T; ++t) dots[t] += static_cast<float>(sums[t]) * scale;
  }
}

#if defined(__AVX2__)
inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float half_to_float(at::Half h) { return _cvtsh_ss(h.x); }

// The vector dot products (requires w.chunked()), the same sums as `scalar_head_dots` in integers per chunk:
// int8: |q| · sign(w, q) (`vpmaddubsw` takes one unsigned operand; |q| ≤ 128 and |w| ≤ 127, so a pair of products
// fits int16), summed over the row in int32; int4: the 64 codes of a chunk, low nibbles (even elements) and high
// nibbles (odd ones) times the activations interleaved to match, Σ (w + 8) q − 8 Σ q per chunk, then × the
// chunk's group scale in float.
template <int T>
void vector_head_dots(const PackedMatrix& w, int64_t r, const HeadActivations& a, int64_t m, float dots[T]) {
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* q = a.codes + m * w.cols;
  if (w.bits == 8) {
    const int8_t* row = w.int8_codes + r * w.cols;
    __m256i sums[T];
    for (int t = 0; t < T; ++t) sums[t] = _mm256_setzero_si256();
    for (int64_t c = 0; c < w.cols; c += 32) {
      const __m256i weights = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c));
      for (int t = 0; t < T; ++t) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + t * w.cols + c));
        const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(x), _mm256_sign_epi8(weights, x));
        sums[t] = _mm256_add_epi32(sums[t], _mm256_madd_epi16(pairs, ones));
      }
    }
    for (int t = 0; t < T; ++t) dots[t] = static_cast<float>(horizontal_sum(sums[t])) * w.row_scales[r];
    return;
  }
  const __m256i mask = _mm256_set1_epi8(15);
  const uint8_t* row = w.int4_codes + r * w.cols / 2;
  const int32_t* offsets = a.offsets + m * a.chunks * 8;
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  int64_t group_index = r * w.cols / w.group, in_group = r * w.cols % w.group;
  for (int64_t c = 0, chunk = 0; c < w.cols; c += 64, ++chunk) {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c / 2));
    const __m256i even = _mm256_and_si256(bytes, mask), odd = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
    const __m256 scale = _mm256_set1_ps(half_to_float(w.group_scales[group_index]));
    if ((in_group += 64) == w.group) {
      in_group = 0;
      ++group_index;
    }
    for (int t = 0; t < T; ++t) {
      const int8_t* x = q + t * w.cols + c;
      const __m256i pairs =
          _mm256_add_epi16(_mm256_maddubs_epi16(even, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))),
                           _mm256_maddubs_epi16(odd, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32))));
      const int32_t* offset = offsets + (t * a.chunks + chunk) * 8;
      const __m256i sums = _mm256_sub_epi32(_mm256_madd_epi16(pairs, ones),
                                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(offset)));
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) dots[t] = horizontal_sum(acc[t]);
}
#endif

template <int T>
void head_dots(const PackedMatrix& w, int64_t r, const HeadActivations& a, int64_t m, float dots[T]) {
#if defined(__AVX2__)
  if (w.chunked()) return vector_head_dots<T>(w, r, a, m, dots);
#endif
  scalar_head_dots<T>(w, r, a.codes + m * w.cols, dots);
}

// x (..., K) → y (..., N) in x's dtype, for the (N, K) matrix stored as `codes` and `scales` (PackedMatrix).
at::Tensor packed_linear(const at::Tensor& input, const at::Tensor& codes, const at::Tensor& scales,
                         int64_t out_features, int64_t bits, int64_t group_size) {
  const at::Tensor x = token_matrix(input, "packed_linear");
  const int64_t tokens = x.size(0), cols = x.size(1);
  PackedMatrix w{cols, bits, group_size, nullptr, nullptr, nullptr, nullptr};
  if (bits == 8) {
    TORCH_CHECK(codes.scalar_type() == at::kChar && codes.is_contiguous() && codes.dim() == 2 &&
                    codes.size(0) == out_features && codes.size(1) == cols,
                "packed_linear: int8 codes must be contiguous int8 (out_features, in_features)");
    TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == out_features,
                "packed_linear: int8 scales must be contiguous float32 with one value per row");
    w.int8_codes = codes.data_ptr<int8_t>();
    w.row_scales = scales.data_ptr<float>();
  } else {
    TORCH_CHECK(bits == 4, "packed_linear: bits must be 8 or 4");
    TORCH_CHECK(group_size >= 2 && group_size % 2 == 0, "packed_linear: int4 group_size must be even and >= 2");
    const int64_t groups = (out_features * cols + group_size - 1) / group_size;
    TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.numel() == groups * group_size / 2,
                "packed_linear: int4 codes must be contiguous uint8, ceil(out * in / group_size) * group_size / 2");
    TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.numel() == groups,
                "packed_linear: int4 scales must be contiguous float16, one per group");
    w.int4_codes = codes.data_ptr<uint8_t>();
    w.group_scales = scales.data_ptr<at::Half>();
  }
  constexpr int64_t kHeadBits = 8;  // the head's activations: int8, as packed_weights.HEAD_ACTIVATION_BITS
  const int64_t levels = (int64_t{1} << (kHeadBits - 1)) - 1;
  const QuantisedTokens& quantised = quantise_tokens(x.data_ptr<float>(), tokens, cols, levels);
  HeadActivations a{quantised.codes.data(), nullptr, cols / 64};
#if defined(__AVX2__)
  thread_local std::vector<int8_t> interleaved;
  thread_local std::vector<int32_t> offsets;
  if (bits == 4 && w.chunked()) {
    // Chunk by chunk: the even elements, then the odd ones (the order of the low and high nibbles).
    interleaved.resize(tokens * cols);
    offsets.assign(tokens * a.chunks * 8, 0);
    for (int64_t m = 0; m < tokens; ++m)
      for (int64_t chunk = 0; chunk < a.chunks; ++chunk) {
        const int8_t* from = a.codes + m * cols + chunk * 64;
        int8_t* to = interleaved.data() + m * cols + chunk * 64;
        int32_t sum = 0;
        for (int i = 0; i < 32; ++i) {
          to[i] = from[2 * i];
          to[32 + i] = from[2 * i + 1];
          sum += from[2 * i] + from[2 * i + 1];
        }
        offsets[(m * a.chunks + chunk) * 8] = 8 * sum;
      }
    a.codes = interleaved.data();
    a.offsets = offsets.data();
  }
#endif
  auto out = at::empty({tokens, out_features}, x.options());
  float* y = out.data_ptr<float>();
  const float* token_absmax = quantised.absmax.data();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, out_features, grain, [&](int64_t begin, int64_t end) {
    for (int64_t block = 0; block < tokens; block += kTokenBlock) {
      const int64_t block_end = std::min(tokens, block + kTokenBlock);
      for (int64_t r = begin; r < end; ++r) {
        int64_t m = block;
        float dots[4];
        for (; m + 4 <= block_end; m += 4) {
          head_dots<4>(w, r, a, m, dots);
          for (int t = 0; t < 4; ++t)
            y[(m + t) * out_features + r] = dots[t] * (token_absmax[m + t] / static_cast<float>(levels));
        }
        for (; m < block_end; ++m) {
          head_dots<1>(w, r, a, m, dots);
          y[m * out_features + r] = dots[0] * (token_absmax[m] / static_cast<float>(levels));
        }
      }
    }
  });
  return shaped_like(out, input);
}

}  // namespace

TORCH_LIBRARY(microvlm_ternary, m) {
  m.def("linear(Tensor x, Tensor packed, int out_features, Tensor weight_scale, Tensor? bias, int bits) -> Tensor");
  m.impl("linear", c10::DispatchKey::CPU, &ternary_linear);
  m.def("packed_linear(Tensor x, Tensor codes, Tensor scales, int out_features, int bits, int group_size) -> Tensor");
  m.impl("packed_linear", c10::DispatchKey::CPU, &packed_linear);
}
"""

_state: dict[str, object] = {}


def kernel_flags() -> list[str]:
    """Compiler flags for this CPU: AVX2 where torch reports it (AVX2 or AVX-512 capability), else portable C++;
    `MICROVLM_TERNARY_KERNEL=portable` asks for the portable C++ everywhere (how the tests check it)."""
    flags = ["-O3"]
    portable = os.environ.get(ENVIRONMENT_SWITCH) == "portable"
    if not portable and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-mf16c"]  # torch's AVX2 capability implies FMA3 and F16C
    return flags


def build_kernel() -> None:
    """Compile (or find in torch's extension cache) and load the kernel; registers `torch.ops.microvlm_ternary`.

    Raises:
        `RuntimeError` or `OSError`: when no compiler or ninja is available, or compilation fails.
    """
    from torch.utils import cpp_extension

    path = os.environ.get("PATH", "")
    # `pip install ninja` puts its binary beside the interpreter, which is not on PATH when the venv is not active.
    os.environ["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{path}"
    try:
        flags = kernel_flags()
        # The source's hash in the name: two versions of this file (two exported folders, two checkouts) build
        # into their own folders of the shared cache instead of rebuilding, or loading, each other's library.
        digest = hashlib.sha256(KERNEL_SOURCE.encode()).hexdigest()[:12]
        cpp_extension.load_inline(
            f"microvlm_ternary_{'avx2' if '-mavx2' in flags else 'portable'}_{digest}",
            KERNEL_SOURCE,
            extra_cflags=flags,
            is_python_module=False,
            no_implicit_headers=True,
        )
    finally:
        os.environ["PATH"] = path


def load_ternary_kernel() -> object | None:
    """`torch.ops.microvlm_ternary.linear`, built on first call; `None` (one warning) when it cannot be built or
    `MICROVLM_TERNARY_KERNEL=0` switches it off, so that callers keep their PyTorch path. The same build registers
    `torch.ops.microvlm_ternary.packed_linear` (`packed_linear`)."""
    if os.environ.get(ENVIRONMENT_SWITCH, "1") == "0":
        return None
    if "kernel" not in _state:
        try:
            build_kernel()
            _state["kernel"] = torch.ops.microvlm_ternary.linear.default
        except (RuntimeError, OSError, ImportError) as error:
            logger.warning(
                "ternary kernel: could not build the native CPU kernel (%s); ternary layers and the packed LM head "
                "use the pure-PyTorch path (same results, slower). Install g++ and ninja (pip install ninja) to get "
                "it, or set %s=0 to silence this.",
                " ".join(str(error).split())[-400:],
                ENVIRONMENT_SWITCH,
            )
            _state["kernel"] = None
    return _state["kernel"]


@contextmanager
def ternary_kernel_disabled() -> Iterator[None]:
    """Within the block, ternary layers and packed LM heads take the pure-PyTorch path (for comparisons and
    tests)."""
    previous = os.environ.get(ENVIRONMENT_SWITCH)
    os.environ[ENVIRONMENT_SWITCH] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[ENVIRONMENT_SWITCH]
        else:
            os.environ[ENVIRONMENT_SWITCH] = previous


def ternary_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    out_features: int,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
) -> torch.Tensor | None:
    """y (..., out_features) = the kernel's x_q · W_qᵀ + b in x's dtype, for x (..., in_features) on the CPU and
    `packed` (ceil(out_features / 4), in_features) uint8; `None` when the kernel is unavailable or does not apply
    (not CPU, activation bits outside [2, 8], or a gradient is wanted), so the caller computes it in PyTorch."""
    if x.device.type != "cpu" or bits is None or not 2 <= bits <= 8 or (x.requires_grad and torch.is_grad_enabled()):
        return None
    kernel = load_ternary_kernel()
    return None if kernel is None else kernel(x, packed, out_features, weight_scale, bias, bits)


def packed_linear(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, out_features: int, bits: int, group_size: int = 0
) -> torch.Tensor | None:
    """y (..., out_features) = x_q · Wᵀ in x's dtype for x (..., in_features) on the CPU, x_q its per-token int8
    quantisation (`bitnet.quantise_activations(x, 8)`), and W (out_features, in_features) stored as
    `packed_weights.Int8Weight` (`bits` 8: int8 `codes` (out, in), float32 `scales` (out, 1)) or `Int4Weight`
    (`bits` 4: uint8 `codes` two per byte, float16 `scales` per `group_size` elements of the flattened W), computed
    in integers: equal to x_q · W_deqᵀ (`packed_weights.quantised_linear`) up to float rounding. `None` where the
    kernel is unavailable or does not apply (not CPU, or a gradient is wanted)."""
    if x.device.type != "cpu" or codes.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()):
        return None
    if load_ternary_kernel() is None:
        return None
    return torch.ops.microvlm_ternary.packed_linear.default(x, codes, scales, out_features, bits, group_size)
