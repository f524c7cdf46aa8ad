// ACmix's convolution path on channels-last tokens, for the CPU backend (Swin-ACmix and PVT-ACmix blocks).
//
// Why: the transformer blocks hold their q, k, v as tokens (B, H*W, 3C). Run with MindSpore's ops (or the
// channel-major group-convolution kernels of local_attention_cpu.cc) the conv path needs the tokens transposed
// to channel-major and regrouped (two 3C-wide copies), the output transposed back, and in shifted Swin blocks
// the cyclic shift and its inverse as two more gathers: most of what a Swin-ACmix-T block spends over a Swin-T
// block (docs/benchmarks.md). And the composed fc x shift weight (ACmixBase.fused_conv) costs 27 N^2 d MACs per
// pixel against 108 N d for the two steps, 6x more at Swin's 24 heads. Here both steps run in one pass over the
// tokens, in their layout, with the shift as index arithmetic:
//
//   maps[p][kk][j] = fc_bias[kk] + sum_g fc[kk][g] * tokens[p][g*d + j]          (the light fc, K2 = k*k maps)
//   on the shifted map S[y][x] = map[(y + s) % H][(x + s) % W] (s = 0: no shift), zero padding k / 2:
//   out_S[y][x][j*P + m] = sum_{kk, u, v} dep[j*P + m][kk][u][v] * maps_S[y + u - k/2][x + v - k/2][kk][j]
//   out[(y + s) % H][(x + s) % W] = out_S[y][x]                                   (the inverse shift)
//
// which is exactly the official fc (3N -> k*k, with bias), permute, and dep_conv (groups = d, no bias; output
// o = j*P + m of group j, P = C_out / d) applied to the cyclically shifted map (Swin-ACmix's quirk) and shifted
// back. The fc bias is inside the maps, so the zero padding treats it as the official code does.
//
// TokenConvForward   inputs tokens (B, L, G*d), fc (K2, G), fc_bias (K2), dep (C, K2, k, k),
//                    config int32 (4,) = H, W, s, k  (L = H*W, map order)      output out (B, L, C)
// TokenConvBackward  inputs dout (B, L, C), tokens, fc, fc_bias, dep, config
//                    outputs dtokens (like tokens), dfc (K2, G), dfc_bias (K2), ddep (like dep)
//   The maps are recomputed (cheaper than keeping them). Weight gradients are summed per chunk of rows and
//   the chunks added in order: deterministic for a thread count.
// TokenConvSplitForward / TokenConvSplitBackward: the same with the groups in two inputs, tokens_a (B, L, Ga*d)
//   at full resolution and tokens_b (B, H_b*W_b, Gb*d) read at each pixel's nearest-upsampling source
//   (floor(y * H_b / H), floor(x * W_b / W)), config (6,) = H, W, s, k, H_b, W_b: PVT-ACmix's q and its
//   spatially reduced k, v without materialising the upsampled, concatenated (B, L, 3C) tensor (MindSpore's
//   CPU Gather and Concat for it cost more than this kernel). Gradients: dtokens_a, dtokens_b (the sum over the
//   pixels that read each b token), dfc, dfc_bias, ddep.
//
// AOT signature (MindSpore 2.8+): int f(int nparam, void **params, int *ndims, int64_t **shapes,
//                                        const char **dtypes, void *stream, void *extra)
// params = inputs then outputs. Return 0 on success; anything else makes MindSpore raise.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include "parallel.h"

namespace {

bool is_float32(const char *dtype) { return std::strcmp(dtype, "float32") == 0 || std::strcmp(dtype, "float") == 0; }

struct TokenConv {
  int64_t batch, height, width, length, groups, dim, kernel, taps, k2, channels, per_out, shift, pad;
  // groups [0, groups_a) come from tokens a (B, L, groups_a*d); the rest from tokens b (B, length_b,
  // groups_b*d), pixel p reading b's token source[p] (the split kernels; groups_b = 0 otherwise)
  int64_t groups_a, groups_b = 0, length_b = 0;
  std::vector<int64_t> source;
  std::vector<int64_t> rows, cols;  // shifted row / column -> map row / column
  int64_t map_index(int64_t y, int64_t x) const { return rows[y] * width + cols[x]; }
  int64_t map_row_size() const { return k2 * dim; }  // floats of one pixel's maps
};

// The token rows of pixel p (flat index over B*L) in a and b, and the same offsets for their gradients.
struct PixelTokens {
  int64_t a, b;
  PixelTokens(const TokenConv &c, int64_t flat)
      : a(flat * c.groups_a * c.dim),
        b(c.groups_b ? ((flat / c.length) * c.length_b + c.source[flat % c.length]) * c.groups_b * c.dim : 0) {}
};

// Checks tokens a (and b: b_shape non-null), fc, fc_bias, dep and the config (H, W, shift, k[, H_b, W_b]);
// false if they do not fit.
bool read_token_conv(const int64_t *a_shape, const int64_t *b_shape, int64_t **weight_shapes, int *weight_ndims,
                     const int32_t *config, TokenConv *c) {
  const int64_t *fc = weight_shapes[0], *fc_bias = weight_shapes[1], *dep = weight_shapes[2];
  if (weight_ndims[0] != 2 || weight_ndims[1] != 1 || weight_ndims[2] != 4) return false;
  c->batch = a_shape[0];
  c->length = a_shape[1];
  c->height = config[0];
  c->width = config[1];
  c->shift = config[2];
  c->kernel = config[3];
  c->k2 = fc[0];
  c->groups = fc[1];
  c->channels = dep[0];
  if (c->height < 1 || c->width < 1 || c->height * c->width != c->length) return false;
  if (c->kernel < 1 || c->kernel % 2 == 0 || c->shift < 0) return false;
  const int64_t width_b = b_shape ? b_shape[2] : 0;
  if (c->groups < 1 || (a_shape[2] + width_b) % c->groups != 0) return false;
  c->dim = (a_shape[2] + width_b) / c->groups;
  if (c->dim < 1 || a_shape[2] % c->dim != 0 || width_b % c->dim != 0) return false;
  c->groups_a = a_shape[2] / c->dim;
  if (b_shape) {
    const int64_t height_b = config[4], width_b_map = config[5];
    c->groups_b = width_b / c->dim;
    c->length_b = b_shape[1];
    if (b_shape[0] != c->batch || height_b < 1 || width_b_map < 1 || height_b * width_b_map != c->length_b) return false;
    c->source.resize(c->length);  // nearest upsampling: source row floor(y * H_b / H), column likewise
    for (int64_t y = 0; y < c->height; ++y) {
      for (int64_t x = 0; x < c->width; ++x) {
        c->source[y * c->width + x] = (y * height_b / c->height) * width_b_map + x * width_b_map / c->width;
      }
    }
  }
  if (fc_bias[0] != c->k2 || dep[1] != c->k2 || dep[2] != c->kernel || dep[3] != c->kernel) return false;
  if (c->channels % c->dim != 0) return false;
  c->per_out = c->channels / c->dim;
  c->taps = c->kernel * c->kernel;
  c->pad = c->kernel / 2;
  c->rows.resize(c->height);
  c->cols.resize(c->width);
  for (int64_t y = 0; y < c->height; ++y) c->rows[y] = (y + c->shift) % c->height;
  for (int64_t x = 0; x < c->width; ++x) c->cols[x] = (x + c->shift) % c->width;
  return true;
}

// dep (C, K2, k, k) -> [m][kk][tap][j] (P, K2, taps, d): the weights of output j*P + m, contiguous in j.
std::vector<float> rearranged_weights(const TokenConv &c, const float *dep) {
  std::vector<float> w(c.channels * c.k2 * c.taps);
  for (int64_t j = 0; j < c.dim; ++j) {
    for (int64_t m = 0; m < c.per_out; ++m) {
      const float *src = dep + (j * c.per_out + m) * c.k2 * c.taps;
      for (int64_t kk = 0; kk < c.k2; ++kk) {
        for (int64_t t = 0; t < c.taps; ++t) w[((m * c.k2 + kk) * c.taps + t) * c.dim + j] = src[kk * c.taps + t];
      }
    }
  }
  return w;
}

// A reusable buffer of at least n floats, one per (calling thread, slot): the kernels' large temporaries are
// not allocated, page-faulted and freed on every call (that cost as much as the arithmetic at Swin's stage 1).
// Each buffer keeps the size of the largest layer that used it, for the life of the thread.
float *scratch(int slot, int64_t n) {
  thread_local std::vector<float> buffers[3];
  std::vector<float> &buffer = buffers[slot];
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// sum_j a[j] * b[j], in 8 interleaved partial sums (a fixed order: vectorises without -ffast-math)
inline float dot(const float *__restrict a, const float *__restrict b, int64_t n) {
  float lanes[8] = {};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int l = 0; l < 8; ++l) lanes[l] += a[j + l] * b[j + l];
  }
  float sum = 0.0f;
  for (; j < n; ++j) sum += a[j] * b[j];
  for (int l = 0; l < 8; ++l) sum += lanes[l];
  return sum;
}

// The neighbours of shifted pixel (y, x): for each tap inside the map, the tap index and the map index of the
// pixel it reads (forward: y + u - pad, x + v - pad) or of the output that reads this pixel through it
// (adjoint: y - u + pad, x - v + pad). Returns how many there are.
int neighbours(const TokenConv &c, int64_t y, int64_t x, bool adjoint, int64_t *tap, int64_t *index) {
  int count = 0;
  for (int64_t u = 0; u < c.kernel; ++u) {
    const int64_t yy = adjoint ? y - u + c.pad : y + u - c.pad;
    if (yy < 0 || yy >= c.height) continue;
    for (int64_t v = 0; v < c.kernel; ++v) {
      const int64_t xx = adjoint ? x - v + c.pad : x + v - c.pad;
      if (xx < 0 || xx >= c.width) continue;
      tap[count] = u * c.kernel + v;
      index[count++] = c.map_index(yy, xx);
    }
  }
  return count;
}

// Vectors of 8 floats (GCC/Clang vector extension: AVX/AVX-512 registers with -march=native, plain code
// elsewhere); loads and stores are unaligned.
typedef float vf8 __attribute__((vector_size(32)));
inline vf8 load8(const float *p) {
  vf8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store8(float *p, vf8 v) { std::memcpy(p, &v, sizeof v); }

template <int V, int KB>
inline void maps_block(const TokenConv &c, const float *token_a, const float *token_b, const float *fc,
                       const float *fc_bias, int64_t k0, float *row) {
  constexpr int D = 8 * V;
  vf8 a[KB][V];
  for (int kb = 0; kb < KB; ++kb) {
    for (int v = 0; v < V; ++v) a[kb][v] = vf8{} + fc_bias[k0 + kb];
  }
  for (int64_t g = 0; g < c.groups; ++g) {
    const float *token = g < c.groups_a ? token_a + g * D : token_b + (g - c.groups_a) * D;
    vf8 in[V];
    for (int v = 0; v < V; ++v) in[v] = load8(token + 8 * v);
    for (int kb = 0; kb < KB; ++kb) {
      const float w = fc[(k0 + kb) * c.groups + g];
      for (int v = 0; v < V; ++v) a[kb][v] += w * in[v];
    }
  }
  for (int kb = 0; kb < KB; ++kb) {
    for (int v = 0; v < V; ++v) store8(row + (k0 + kb) * D + 8 * v, a[kb][v]);
  }
}

// maps (B, L, K2, d) of every pixel: the fc over the G groups of its token, plus the bias; d = 8 * V
// (V = 0: any d, scalar loops). Blocks of 3 maps stay in registers while the token's groups stream by.
template <int V>
void compute_maps(const TokenConv &c, const float *tokens_a, const float *tokens_b, const float *fc,
                  const float *fc_bias, float *maps) {
  const int64_t d = c.dim, row_size = c.map_row_size();
  acmix::parallel_for(c.batch * c.length, [&](int64_t first, int64_t last, int64_t) {
    for (int64_t p = first; p < last; ++p) {
      const PixelTokens at(c, p);
      const float *token_a = tokens_a + at.a, *token_b = tokens_b + at.b;
      float *row = maps + p * row_size;
      if constexpr (V == 0) {
        for (int64_t kk = 0; kk < c.k2; ++kk) {
          float *__restrict out = row + kk * d;
          std::fill(out, out + d, fc_bias[kk]);
          for (int64_t g = 0; g < c.groups; ++g) {
            const float w = fc[kk * c.groups + g];
            const float *__restrict in = g < c.groups_a ? token_a + g * d : token_b + (g - c.groups_a) * d;
            for (int64_t j = 0; j < d; ++j) out[j] += w * in[j];
          }
        }
      } else {
        int64_t k0 = 0;
        for (; k0 + 3 <= c.k2; k0 += 3) maps_block<V, 3>(c, token_a, token_b, fc, fc_bias, k0, row);
        for (; k0 < c.k2; ++k0) maps_block<V, 1>(c, token_a, token_b, fc, fc_bias, k0, row);
      }
    }
  });
}

// acc[m][j] = sum over the n taps and kk of w[m][kk][tap][j] * maps[index][kk][j], for m in [m0, m0 + MB):
// d = 8 * V, the MB x V accumulators stay in registers.
template <int V, int MB>
void forward_block(const TokenConv &c, const float *w, const float *maps_b, int n, const int64_t *tap,
                   const int64_t *index, int64_t m0, float *acc) {
  constexpr int D = 8 * V;
  vf8 a[MB][V] = {};
  const int64_t m_stride = c.k2 * c.taps * D, row_size = c.k2 * D;
  for (int i = 0; i < n; ++i) {
    const float *src = maps_b + index[i] * row_size;
    const float *wt0 = w + (m0 * c.k2 * c.taps + tap[i]) * D;
    for (int64_t kk = 0; kk < c.k2; ++kk) {
      vf8 in[V];
      for (int v = 0; v < V; ++v) in[v] = load8(src + kk * D + 8 * v);
      const float *wt = wt0 + kk * c.taps * D;
      for (int mb = 0; mb < MB; ++mb) {
        for (int v = 0; v < V; ++v) a[mb][v] += load8(wt + mb * m_stride + 8 * v) * in[v];
      }
    }
  }
  for (int mb = 0; mb < MB; ++mb) {
    for (int v = 0; v < V; ++v) store8(acc + (m0 + mb) * D + 8 * v, a[mb][v]);
  }
}

// dmaps[kk][j] = sum over the n output neighbours and m of w[m][kk][tap][j] * g[index][m][j], for kk in
// [k0, k0 + KB) (g: the output gradient, each pixel's channels as [m][j]).
template <int V, int KB>
void adjoint_block(const TokenConv &c, const float *w, const float *g_b, int n, const int64_t *tap,
                   const int64_t *index, int64_t k0, float *dmaps) {
  constexpr int D = 8 * V;
  vf8 a[KB][V] = {};
  for (int i = 0; i < n; ++i) {
    const float *g = g_b + index[i] * c.channels;
    for (int64_t m = 0; m < c.per_out; ++m) {
      vf8 gm[V];
      for (int v = 0; v < V; ++v) gm[v] = load8(g + m * D + 8 * v);
      const float *wt = w + ((m * c.k2 + k0) * c.taps + tap[i]) * D;
      for (int kb = 0; kb < KB; ++kb) {
        for (int v = 0; v < V; ++v) a[kb][v] += load8(wt + kb * c.taps * D + 8 * v) * gm[v];
      }
    }
  }
  for (int kb = 0; kb < KB; ++kb) {
    for (int v = 0; v < V; ++v) store8(dmaps + (k0 + kb) * D + 8 * v, a[kb][v]);
  }
}

// gdep[m][kk][tap][j] += sum over the shifted pixels x of row y whose tap lies inside the map of
// g[y, x][m][j] * maps[neighbour][kk][j], for m in [m0, m0 + MB); one tap (u, v).
template <int V, int MB>
void dep_grad_block(const TokenConv &c, const float *g_b, const float *maps_b, int64_t y, int64_t u, int64_t v,
                    int64_t m0, int64_t kk, float *gdep) {
  constexpr int D = 8 * V;
  const int64_t yy = y + u - c.pad;
  if (yy < 0 || yy >= c.height) return;
  const int64_t x_first = std::max<int64_t>(0, c.pad - v), x_last = std::min(c.width, c.width + c.pad - v);
  vf8 a[MB][V] = {};
  for (int64_t x = x_first; x < x_last; ++x) {
    const float *in = maps_b + c.map_index(yy, x + v - c.pad) * c.k2 * D + kk * D;
    const float *g = g_b + c.map_index(y, x) * c.channels + m0 * D;
    vf8 iv[V];
    for (int t = 0; t < V; ++t) iv[t] = load8(in + 8 * t);
    for (int mb = 0; mb < MB; ++mb) {
      for (int t = 0; t < V; ++t) a[mb][t] += load8(g + mb * D + 8 * t) * iv[t];
    }
  }
  const int64_t tap = u * c.kernel + v;
  for (int mb = 0; mb < MB; ++mb) {
    float *dst = gdep + (((m0 + mb) * c.k2 + kk) * c.taps + tap) * D;
    for (int t = 0; t < V; ++t) store8(dst + 8 * t, load8(dst + 8 * t) + a[mb][t]);
  }
}

// The per-pixel steps for d = 8 * V (V = 1, 2, 4, 8), or for any d with scalar loops (V = 0).
template <int V>
struct Steps {
  static constexpr int kBlock = 3;
  template <int B, class F>
  static void blocks(int64_t count, F &&fn) {  // fn.template operator()<size>(first) over blocks of B, then 1
    int64_t first = 0;
    for (; first + B <= count; first += B) fn(std::integral_constant<int, B>(), first);
    for (; first < count; ++first) fn(std::integral_constant<int, 1>(), first);
  }

  // acc (P, d) = the output of one pixel, from its n neighbours' maps
  static void forward(const TokenConv &c, const float *w, const float *maps_b, int n, const int64_t *tap,
                      const int64_t *index, float *acc) {
    if constexpr (V == 0) {
      const int64_t d = c.dim;
      std::fill(acc, acc + c.channels, 0.0f);
      for (int i = 0; i < n; ++i) {
        const float *src = maps_b + index[i] * c.map_row_size();
        for (int64_t kk = 0; kk < c.k2; ++kk) {
          for (int64_t m = 0; m < c.per_out; ++m) {
            const float *wt = w + ((m * c.k2 + kk) * c.taps + tap[i]) * d;
            for (int64_t j = 0; j < d; ++j) acc[m * d + j] += wt[j] * src[kk * d + j];
          }
        }
      }
    } else {
      blocks<kBlock>(c.per_out, [&](auto size, int64_t m0) {
        forward_block<V, decltype(size)::value>(c, w, maps_b, n, tap, index, m0, acc);
      });
    }
  }

  // dmaps (K2, d) of one pixel, from the gradients of the n outputs that read it
  static void adjoint(const TokenConv &c, const float *w, const float *g_b, int n, const int64_t *tap,
                      const int64_t *index, float *dmaps) {
    if constexpr (V == 0) {
      const int64_t d = c.dim;
      std::fill(dmaps, dmaps + c.map_row_size(), 0.0f);
      for (int i = 0; i < n; ++i) {
        const float *g = g_b + index[i] * c.channels;
        for (int64_t kk = 0; kk < c.k2; ++kk) {
          for (int64_t m = 0; m < c.per_out; ++m) {
            const float *wt = w + ((m * c.k2 + kk) * c.taps + tap[i]) * d;
            for (int64_t j = 0; j < d; ++j) dmaps[kk * d + j] += wt[j] * g[m * d + j];
          }
        }
      }
    } else {
      blocks<kBlock>(c.k2, [&](auto size, int64_t k0) {
        adjoint_block<V, decltype(size)::value>(c, w, g_b, n, tap, index, k0, dmaps);
      });
    }
  }

  // Through the fc for one pixel: dtoken[g][j] = sum_kk fc[kk][g] * dmaps[kk][j]; gfc[kk][g][l] and gbias[kk][l]
  // (8 lanes each, summed at the end) collect dmaps[kk] . token[g] and sum_j dmaps[kk][j].
  static void through_fc(const TokenConv &c, const float *token_a, const float *token_b, const float *dmaps,
                         const float *fc, float *dtoken_a, float *dtoken_b, float *gfc, float *gbias) {
    if constexpr (V == 0) {
      const int64_t d = c.dim;
      for (int64_t g = 0; g < c.groups; ++g) {
        const bool in_a = g < c.groups_a;
        const float *token = in_a ? token_a + g * d : token_b + (g - c.groups_a) * d;
        float *__restrict dt = in_a ? dtoken_a + g * d : dtoken_b + (g - c.groups_a) * d;
        std::fill(dt, dt + d, 0.0f);
        for (int64_t kk = 0; kk < c.k2; ++kk) {
          const float wkg = fc[kk * c.groups + g];
          const float *__restrict dm = dmaps + kk * d;
          for (int64_t j = 0; j < d; ++j) dt[j] += wkg * dm[j];
          gfc[(kk * c.groups + g) * 8] += dot(dm, token, d);
        }
      }
      for (int64_t kk = 0; kk < c.k2; ++kk) gbias[kk * 8] += std::accumulate(dmaps + kk * d, dmaps + (kk + 1) * d, 0.0f);
    } else {
      constexpr int D = 8 * V;
      for (int64_t g = 0; g < c.groups; ++g) {
        const bool in_a = g < c.groups_a;
        const float *token = in_a ? token_a + g * D : token_b + (g - c.groups_a) * D;
        float *dtoken = in_a ? dtoken_a + g * D : dtoken_b + (g - c.groups_a) * D;
        vf8 in[V], dt[V] = {};
        for (int v = 0; v < V; ++v) in[v] = load8(token + 8 * v);
        for (int64_t kk = 0; kk < c.k2; ++kk) {
          const float wkg = fc[kk * c.groups + g];
          vf8 acc = load8(gfc + (kk * c.groups + g) * 8);
          for (int v = 0; v < V; ++v) {
            const vf8 dm = load8(dmaps + kk * D + 8 * v);
            dt[v] += wkg * dm;
            acc += dm * in[v];
          }
          store8(gfc + (kk * c.groups + g) * 8, acc);
        }
        for (int v = 0; v < V; ++v) store8(dtoken + 8 * v, dt[v]);
      }
      for (int64_t kk = 0; kk < c.k2; ++kk) {
        vf8 acc = load8(gbias + kk * 8);
        for (int v = 0; v < V; ++v) acc += load8(dmaps + kk * D + 8 * v);
        store8(gbias + kk * 8, acc);
      }
    }
  }

  // gdep += the dep gradient of the outputs of shifted row y
  static void dep_grad(const TokenConv &c, const float *g_b, const float *maps_b, int64_t y, float *gdep) {
    if constexpr (V == 0) {
      const int64_t d = c.dim;
      std::vector<int64_t> tap(c.taps), index(c.taps);
      for (int64_t x = 0; x < c.width; ++x) {
        const float *g = g_b + c.map_index(y, x) * c.channels;
        const int n = neighbours(c, y, x, false, tap.data(), index.data());
        for (int i = 0; i < n; ++i) {
          const float *src = maps_b + index[i] * c.map_row_size();
          for (int64_t kk = 0; kk < c.k2; ++kk) {
            for (int64_t m = 0; m < c.per_out; ++m) {
              float *gd = gdep + ((m * c.k2 + kk) * c.taps + tap[i]) * d;
              for (int64_t j = 0; j < d; ++j) gd[j] += g[m * d + j] * src[kk * d + j];
            }
          }
        }
      }
    } else {
      for (int64_t u = 0; u < c.kernel; ++u) {
        for (int64_t v = 0; v < c.kernel; ++v) {
          for (int64_t kk = 0; kk < c.k2; ++kk) {
            blocks<kBlock>(c.per_out, [&](auto size, int64_t m0) {
              dep_grad_block<V, decltype(size)::value>(c, g_b, maps_b, y, u, v, m0, kk, gdep);
            });
          }
        }
      }
    }
  }
};

}  // namespace

namespace {

template <int V>
void forward(const TokenConv &c, const float *tokens_a, const float *tokens_b, const float *fc,
             const float *fc_bias, const float *dep, float *out) {
  const std::vector<float> w = rearranged_weights(c, dep);
  const int64_t d = c.dim, row_size = c.map_row_size();
  float *maps = scratch(0, c.batch * c.length * row_size);
  compute_maps<V>(c, tokens_a, tokens_b, fc, fc_bias, maps);
  acmix::parallel_for(c.batch * c.height, [&](int64_t first, int64_t last, int64_t) {
    std::vector<float> acc(c.channels);
    std::vector<int64_t> tap(c.taps), index(c.taps);
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task / c.height, y = task % c.height;
      const float *maps_b = maps + b * c.length * row_size;
      float *out_b = out + b * c.length * c.channels;
      for (int64_t x = 0; x < c.width; ++x) {
        const int n = neighbours(c, y, x, false, tap.data(), index.data());
        Steps<V>::forward(c, w.data(), maps_b, n, tap.data(), index.data(), acc.data());
        float *dst = out_b + c.map_index(y, x) * c.channels;
        for (int64_t j = 0; j < d; ++j) {
          for (int64_t m = 0; m < c.per_out; ++m) dst[j * c.per_out + m] = acc[m * d + j];
        }
      }
    }
  });
}

template <int V>
void backward(const TokenConv &c, const float *dout, const float *tokens_a, const float *tokens_b, const float *fc,
              const float *fc_bias, const float *dep, float *dtokens_a, float *dtokens_b, float *dfc,
              float *dfc_bias, float *ddep) {
  const int64_t d = c.dim, row_size = c.map_row_size(), per_out = c.per_out;
  const std::vector<float> w = rearranged_weights(c, dep);
  float *maps = scratch(0, c.batch * c.length * row_size);
  compute_maps<V>(c, tokens_a, tokens_b, fc, fc_bias, maps);
  // the gradient of b's groups per pixel (B, L, groups_b*d), summed over the pixels sharing a b token below
  const int64_t b_size = c.groups_b * d;
  float *dtokens_b_full = c.groups_b ? scratch(2, c.batch * c.length * b_size) : nullptr;
  // dout with each pixel's channels j*P + m stored as [m][j]
  float *dout_t = scratch(1, c.batch * c.length * c.channels);
  acmix::parallel_for(c.batch * c.length, [&](int64_t first, int64_t last, int64_t) {
    for (int64_t p = first; p < last; ++p) {
      const float *src = dout + p * c.channels;
      float *dst = dout_t + p * c.channels;
      for (int64_t j = 0; j < d; ++j) {
        for (int64_t m = 0; m < per_out; ++m) dst[m * d + j] = src[j * per_out + m];
      }
    }
  });
  const int64_t rows = c.batch * c.height, chunks = acmix::num_chunks(rows);
  const int64_t fc_size = c.k2 * c.groups, dep_size = c.channels * c.k2 * c.taps;
  std::vector<float> partial_fc(chunks * fc_size * 8, 0.0f), partial_bias(chunks * c.k2 * 8, 0.0f);  // 8 lanes
  std::vector<float> partial_dep(chunks * dep_size, 0.0f);  // [m][kk][tap][j] per chunk
  acmix::parallel_for(rows, [&](int64_t first, int64_t last, int64_t chunk) {
    std::vector<float> dmaps(row_size);
    std::vector<int64_t> tap(c.taps), index(c.taps);
    float *gfc = partial_fc.data() + chunk * fc_size * 8;
    float *gbias = partial_bias.data() + chunk * c.k2 * 8;
    float *gdep = partial_dep.data() + chunk * dep_size;
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task / c.height, y = task % c.height;
      const float *maps_b = maps + b * c.length * row_size;
      const float *dout_b = dout_t + b * c.length * c.channels;
      for (int64_t x = 0; x < c.width; ++x) {
        const int64_t here = c.map_index(y, x);
        // gradient of this pixel's maps: every output whose window holds it, at the tap that reads it
        const int n = neighbours(c, y, x, true, tap.data(), index.data());
        Steps<V>::adjoint(c, w.data(), dout_b, n, tap.data(), index.data(), dmaps.data());
        // through the fc: token gradient, fc and bias gradients
        const PixelTokens at(c, b * c.length + here);
        Steps<V>::through_fc(c, tokens_a + at.a, tokens_b + at.b, dmaps.data(), fc, dtokens_a + at.a,
                             dtokens_b_full + (b * c.length + here) * b_size, gfc, gbias);
      }
      // dep gradient of this row's outputs: their output gradients times the maps each tap read
      Steps<V>::dep_grad(c, dout_b, maps_b, y, gdep);
    }
  });
  if (c.groups_b) {  // each b token: the sum over its pixels, in pixel order (deterministic)
    std::vector<int64_t> start(c.length_b + 1, 0), pixels(c.length);
    for (int64_t p = 0; p < c.length; ++p) ++start[c.source[p] + 1];
    for (int64_t r = 0; r < c.length_b; ++r) start[r + 1] += start[r];
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < c.length; ++p) pixels[fill[c.source[p]]++] = p;
    acmix::parallel_for(c.batch * c.length_b, [&](int64_t first, int64_t last, int64_t) {
      for (int64_t task = first; task < last; ++task) {
        const int64_t b = task / c.length_b, r = task % c.length_b;
        float *__restrict dst = dtokens_b + task * b_size;
        std::fill(dst, dst + b_size, 0.0f);
        for (int64_t i = start[r]; i < start[r + 1]; ++i) {
          const float *__restrict src = dtokens_b_full + (b * c.length + pixels[i]) * b_size;
          for (int64_t e = 0; e < b_size; ++e) dst[e] += src[e];
        }
      }
    });
  }
  // chunk partial sums, in chunk order; the dep gradient back to (C, K2, k, k)
  std::fill(dfc, dfc + fc_size, 0.0f);
  std::fill(dfc_bias, dfc_bias + c.k2, 0.0f);
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    for (int64_t i = 0; i < fc_size; ++i) {
      const float *lanes = partial_fc.data() + (chunk * fc_size + i) * 8;
      dfc[i] += std::accumulate(lanes, lanes + 8, 0.0f);
    }
    for (int64_t i = 0; i < c.k2; ++i) {
      const float *lanes = partial_bias.data() + (chunk * c.k2 + i) * 8;
      dfc_bias[i] += std::accumulate(lanes, lanes + 8, 0.0f);
    }
  }
  acmix::parallel_for(c.channels, [&](int64_t first, int64_t last, int64_t) {
    for (int64_t o = first; o < last; ++o) {
      const int64_t j = o / per_out, m = o % per_out;
      for (int64_t kk = 0; kk < c.k2; ++kk) {
        for (int64_t t = 0; t < c.taps; ++t) {
          const int64_t at = ((m * c.k2 + kk) * c.taps + t) * d + j;
          float sum = 0.0f;
          for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += partial_dep[chunk * dep_size + at];
          ddep[(o * c.k2 + kk) * c.taps + t] = sum;
        }
      }
    }
  });
}

// fn(std::integral_constant<int, V>) with V = d / 8 for d = 8, 16, 32, 64 (vectorised steps), else V = 0.
template <class F>
void dispatch_width(int64_t d, F &&fn) {
  switch (d) {
    case 8: fn(std::integral_constant<int, 1>()); break;
    case 16: fn(std::integral_constant<int, 2>()); break;
    case 32: fn(std::integral_constant<int, 4>()); break;
    case 64: fn(std::integral_constant<int, 8>()); break;
    default: fn(std::integral_constant<int, 0>());
  }
}

}  // namespace

extern "C" {

// TokenConvForward: tokens, fc, fc_bias, dep, config (4,) -> out.
int TokenConvForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                     void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 6) return 1;
  for (int t : {0, 1, 2, 3, 5}) {
    if (!is_float32(dtypes[t])) return 2;
  }
  TokenConv c;
  if (ndims[0] != 3 || !read_token_conv(shapes[0], nullptr, shapes + 1, ndims + 1,
                                        static_cast<const int32_t *>(params[4]), &c))
    return 2;
  if (ndims[5] != 3 || shapes[5][0] != c.batch || shapes[5][1] != c.length || shapes[5][2] != c.channels) return 2;
  dispatch_width(c.dim, [&](auto v) {
    forward<decltype(v)::value>(c, static_cast<const float *>(params[0]), nullptr,
                                static_cast<const float *>(params[1]), static_cast<const float *>(params[2]),
                                static_cast<const float *>(params[3]), static_cast<float *>(params[5]));
  });
  return 0;
}

// TokenConvBackward: dout, tokens, fc, fc_bias, dep, config -> dtokens, dfc, dfc_bias, ddep.
int TokenConvBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                      void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 10) return 1;
  for (int t : {0, 1, 2, 3, 4, 6, 7, 8, 9}) {
    if (!is_float32(dtypes[t])) return 2;
  }
  TokenConv c;
  if (ndims[1] != 3 || !read_token_conv(shapes[1], nullptr, shapes + 2, ndims + 2,
                                        static_cast<const int32_t *>(params[5]), &c))
    return 2;
  if (ndims[0] != 3 || shapes[0][0] != c.batch || shapes[0][1] != c.length || shapes[0][2] != c.channels) return 2;
  for (int t = 0; t < 3; ++t) {
    if (shapes[6][t] != shapes[1][t]) return 2;
  }
  dispatch_width(c.dim, [&](auto v) {
    backward<decltype(v)::value>(
        c, static_cast<const float *>(params[0]), static_cast<const float *>(params[1]), nullptr,
        static_cast<const float *>(params[2]), static_cast<const float *>(params[3]),
        static_cast<const float *>(params[4]), static_cast<float *>(params[6]), nullptr,
        static_cast<float *>(params[7]), static_cast<float *>(params[8]), static_cast<float *>(params[9]));
  });
  return 0;
}

// TokenConvSplitForward: tokens_a (B, L, Ga*d), tokens_b (B, H_b*W_b, Gb*d), fc, fc_bias, dep,
// config (6,) = H, W, shift, k, H_b, W_b -> out. Group g < Ga of pixel p is a's; the others are b's token at
// the nearest-upsampling source of p (PVT-ACmix: q at full resolution, the reduced k and v).
int TokenConvSplitForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 7) return 1;
  for (int t : {0, 1, 2, 3, 4, 6}) {
    if (!is_float32(dtypes[t])) return 2;
  }
  TokenConv c;
  if (ndims[0] != 3 || ndims[1] != 3 || ndims[5] != 1 || shapes[5][0] != 6 ||
      !read_token_conv(shapes[0], shapes[1], shapes + 2, ndims + 2, static_cast<const int32_t *>(params[5]), &c))
    return 2;
  if (ndims[6] != 3 || shapes[6][0] != c.batch || shapes[6][1] != c.length || shapes[6][2] != c.channels) return 2;
  dispatch_width(c.dim, [&](auto v) {
    forward<decltype(v)::value>(c, static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                                static_cast<const float *>(params[2]), static_cast<const float *>(params[3]),
                                static_cast<const float *>(params[4]), static_cast<float *>(params[6]));
  });
  return 0;
}

// TokenConvSplitBackward: dout, tokens_a, tokens_b, fc, fc_bias, dep, config -> dtokens_a, dtokens_b, dfc,
// dfc_bias, ddep.
int TokenConvSplitBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 12) return 1;
  for (int t : {0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11}) {
    if (!is_float32(dtypes[t])) return 2;
  }
  TokenConv c;
  if (ndims[1] != 3 || ndims[2] != 3 || ndims[6] != 1 || shapes[6][0] != 6 ||
      !read_token_conv(shapes[1], shapes[2], shapes + 3, ndims + 3, static_cast<const int32_t *>(params[6]), &c))
    return 2;
  if (ndims[0] != 3 || shapes[0][0] != c.batch || shapes[0][1] != c.length || shapes[0][2] != c.channels) return 2;
  for (int t = 0; t < 3; ++t) {
    if (shapes[7][t] != shapes[1][t] || shapes[8][t] != shapes[2][t]) return 2;
  }
  dispatch_width(c.dim, [&](auto v) {
    backward<decltype(v)::value>(
        c, static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
        static_cast<const float *>(params[2]), static_cast<const float *>(params[3]),
        static_cast<const float *>(params[4]), static_cast<const float *>(params[5]), static_cast<float *>(params[7]),
        static_cast<float *>(params[8]), static_cast<float *>(params[9]), static_cast<float *>(params[10]),
        static_cast<float *>(params[11]));
  });
  return 0;
}

}  // extern "C"
