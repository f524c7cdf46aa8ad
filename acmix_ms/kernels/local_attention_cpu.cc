// Sliding-window attention aggregation for the CPU backend: MindSpore ops.Custom(func_type="aot") kernels.
//
// The same computation as acmix_ms.local_attention.UnfoldLocalAttention, without any (BN, d, k*k, H', W')
// temporary: every head (b) is handled by one thread (acmix::parallel_for, parallel.h), walking the k*k
// offsets over the padded keys/values in place. Memory: the outputs plus one (k*k, H', W') scratch per thread
// in the backward pass.
//
// Two entry points per pass:
//   LocalAttentionForward/Backward: from the strided, scaled query and the padded keys and values (the
//     interface of acmix_ms.local_attention's aggregation Cells);
//   LocalAttentionQKVForward/Backward: straight from ACmixLocal's projection qkv (B, 3C, H, W) and the
//     positional map: the query scaling and striding, the subtraction of the positional term and the
//     reflection padding happen here, per head, in thread-local scratch (no pad/slice/sub ops, no padded
//     tensors in the graph), and the backward folds the padding back and returns d qkv and d pe.
//
// Layout: NCHW float32, contiguous.
//   query     q  (BN, d, Ho, Wo)        already scaled and strided
//   key_pad   kp (BN, d, Hp, Wp)        reflection-padded keys (minus the positional term)
//   value_pad vp (BN, d, Hp, Wp)
//   config       int32 (3,)             kernel_size, stride, dilation
// Neighbour p = (u, v) of output pixel (i, j) sits at padded (u*dil + i*s, v*dil + j*s).
//
// AOT signature (MindSpore 2.8+): int f(int nparam, void **params, int *ndims, int64_t **shapes,
//                                        const char **dtypes, void *stream, void *extra)
// params = inputs then outputs. Return 0 on success; anything else makes MindSpore raise.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "parallel.h"

namespace {

struct Geometry {
  int64_t heads, dim, out_h, out_w, pad_h, pad_w;
  int kernel, stride, dilation;
  int64_t out_plane() const { return out_h * out_w; }
  int64_t pad_plane() const { return pad_h * pad_w; }
  int64_t offsets() const { return static_cast<int64_t>(kernel) * kernel; }
  // Flat index in a padded plane of neighbour p of output pixel (i, 0).
  int64_t row_start(int64_t p, int64_t i) const {
    return ((p / kernel) * dilation + i * stride) * pad_w + (p % kernel) * dilation;
  }
};

bool is_float32(const char *dtype) { return std::strcmp(dtype, "float32") == 0 || std::strcmp(dtype, "float") == 0; }

// Reads and checks the geometry; false if shapes or dtypes do not fit (MindSpore then raises).
bool read_geometry(int64_t **shapes, int *ndims, const char **dtypes, const int32_t *config, int query_index,
                   int key_index, int first_float, int last_float, Geometry *g) {
  for (int t = first_float; t <= last_float; ++t) {
    if (!is_float32(dtypes[t])) return false;
  }
  if (ndims[query_index] != 4 || ndims[key_index] != 4) return false;
  g->heads = shapes[query_index][0];
  g->dim = shapes[query_index][1];
  g->out_h = shapes[query_index][2];
  g->out_w = shapes[query_index][3];
  g->pad_h = shapes[key_index][2];
  g->pad_w = shapes[key_index][3];
  g->kernel = config[0];
  g->stride = config[1];
  g->dilation = config[2];
  if (g->kernel < 1 || g->stride < 1 || g->dilation < 1) return false;
  if (shapes[key_index][0] != g->heads || shapes[key_index][1] != g->dim) return false;
  const int64_t reach = static_cast<int64_t>(g->kernel - 1) * g->dilation + 1;
  return (g->out_h - 1) * g->stride + reach <= g->pad_h && (g->out_w - 1) * g->stride + reach <= g->pad_w;
}

// dst[j] += x[j] * src[j * stride] for j < n; the stride-1 branch is the one compilers vectorise.
inline void add_products(float *__restrict dst, const float *__restrict x, const float *__restrict src, int64_t n,
                         int64_t stride) {
  if (stride == 1) {
    for (int64_t j = 0; j < n; ++j) dst[j] += x[j] * src[j];
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] += x[j] * src[j * stride];
  }
}

// acc[p, i, j] += sum_c a[c, i, j] * padded[c, neighbour p of (i, j)]   for all p  (acc: k*k planes)
void correlate(const Geometry &g, const float *a, const float *padded, float *acc) {
  for (int64_t p = 0; p < g.offsets(); ++p) {
    float *acc_p = acc + p * g.out_plane();
    for (int64_t c = 0; c < g.dim; ++c) {
      const float *a_c = a + c * g.out_plane();
      const float *pad_c = padded + c * g.pad_plane();
      for (int64_t i = 0; i < g.out_h; ++i) {
        add_products(acc_p + i * g.out_w, a_c + i * g.out_w, pad_c + g.row_start(p, i), g.out_w, g.stride);
      }
    }
  }
}

// out[c, i, j] = sum_p weights[p, i, j] * padded[c, neighbour p of (i, j)]   (out: d planes, overwritten)
void gather(const Geometry &g, const float *weights, const float *padded, float *out) {
  for (int64_t c = 0; c < g.dim; ++c) {
    float *out_c = out + c * g.out_plane();
    std::fill(out_c, out_c + g.out_plane(), 0.0f);
    const float *pad_c = padded + c * g.pad_plane();
    for (int64_t p = 0; p < g.offsets(); ++p) {
      const float *w_p = weights + p * g.out_plane();
      for (int64_t i = 0; i < g.out_h; ++i) {
        add_products(out_c + i * g.out_w, w_p + i * g.out_w, pad_c + g.row_start(p, i), g.out_w, g.stride);
      }
    }
  }
}

// grad_padded[c, neighbour p of (i, j)] += weights[p, i, j] * a[c, i, j]   (adjoint of gather w.r.t. padded)
void scatter(const Geometry &g, const float *weights, const float *a, float *grad_padded) {
  const int64_t s = g.stride;
  std::fill(grad_padded, grad_padded + g.dim * g.pad_plane(), 0.0f);
  for (int64_t c = 0; c < g.dim; ++c) {
    const float *a_c = a + c * g.out_plane();
    float *grad_c = grad_padded + c * g.pad_plane();
    for (int64_t p = 0; p < g.offsets(); ++p) {
      const float *w_p = weights + p * g.out_plane();
      for (int64_t i = 0; i < g.out_h; ++i) {
        float *dst = grad_c + g.row_start(p, i);
        const float *w_row = w_p + i * g.out_w;
        const float *a_row = a_c + i * g.out_w;
        if (s == 1) {
          for (int64_t j = 0; j < g.out_w; ++j) dst[j] += w_row[j] * a_row[j];
        } else {
          for (int64_t j = 0; j < g.out_w; ++j) dst[j * s] += w_row[j] * a_row[j];
        }
      }
    }
  }
}

// In place over the k*k planes of one head: logits -> softmax over p at every pixel.
void softmax_over_offsets(const Geometry &g, float *planes, float *scratch_max, float *scratch_sum) {
  const int64_t n = g.out_plane();
  std::copy(planes, planes + n, scratch_max);
  for (int64_t p = 1; p < g.offsets(); ++p) {
    const float *plane = planes + p * n;
    for (int64_t x = 0; x < n; ++x) scratch_max[x] = std::max(scratch_max[x], plane[x]);
  }
  std::fill(scratch_sum, scratch_sum + n, 0.0f);
  for (int64_t p = 0; p < g.offsets(); ++p) {
    float *plane = planes + p * n;
    for (int64_t x = 0; x < n; ++x) {
      plane[x] = std::exp(plane[x] - scratch_max[x]);
      scratch_sum[x] += plane[x];
    }
  }
  for (int64_t x = 0; x < n; ++x) scratch_sum[x] = 1.0f / scratch_sum[x];
  for (int64_t p = 0; p < g.offsets(); ++p) {
    float *plane = planes + p * n;
    for (int64_t x = 0; x < n; ++x) plane[x] *= scratch_sum[x];
  }
}

// In place: d loss / d weights -> d loss / d logits, dL_p = A_p * (dA_p - sum_q A_q dA_q) at every pixel.
void softmax_backward(const Geometry &g, const float *weights, float *grad, float *total) {
  const int64_t n = g.out_plane();
  std::fill(total, total + n, 0.0f);
  for (int64_t p = 0; p < g.offsets(); ++p) {
    const float *w_p = weights + p * n;
    const float *g_p = grad + p * n;
    for (int64_t x = 0; x < n; ++x) total[x] += w_p[x] * g_p[x];
  }
  for (int64_t p = 0; p < g.offsets(); ++p) {
    const float *w_p = weights + p * n;
    float *g_p = grad + p * n;
    for (int64_t x = 0; x < n; ++x) g_p[x] = w_p[x] * (g_p[x] - total[x]);
  }
}

// ---- from qkv --------------------------------------------------------------------------------------------
// qkv (B, 3C, H, W), C = N * d: group g < 3N (q: n, k: N + n, v: 2N + n for head n) of channel j < d is
// qkv channel g * d + j (layout 0, the official one) or j * 3N + g (layout 1, channel-major: the layout the
// fused conv path of acmix_ms.base reads without a transpose). pe (1, d, H, W) is subtracted from the keys.
// config int32 (5,): kernel_size, stride, dilation, num_heads, layout.

// Index into [0, size) of padded position t - pad under the reflection of acmix_ms.spatial.reflect_pad:
// mirror-symmetric about the first and last pixel (period 2 * (size - 1)), any pad; size 1 repeats.
int64_t reflect_index(int64_t t, int64_t size) {
  if (size == 1) return 0;
  const int64_t period = 2 * (size - 1);
  int64_t r = t % period;
  if (r < 0) r += period;
  return r < size ? r : period - r;
}

struct QKVGeometry {
  Geometry g;  // heads = B * N, dim = d, out/pad sizes as in the padded interface
  int64_t batch, num_heads, height, width, pad;
  int layout;
  int64_t plane() const { return height * width; }
  int64_t channels() const { return num_heads * g.dim; }
  // offset of the (height, width) plane of group `group`, channel j of image `image` in qkv
  int64_t qkv_plane(int64_t image, int64_t group, int64_t j) const {
    const int64_t channel = layout == 0 ? group * g.dim + j : j * 3 * num_heads + group;
    return (image * 3 * channels() + channel) * plane();
  }
};

bool read_qkv_geometry(int64_t **shapes, int *ndims, const char **dtypes, const int32_t *config, int first_float,
                       int last_float, int qkv_index, int pe_index, QKVGeometry *q) {
  for (int t = first_float; t <= last_float; ++t) {
    if (!is_float32(dtypes[t])) return false;
  }
  if (ndims[qkv_index] != 4 || ndims[pe_index] != 4) return false;
  Geometry &g = q->g;
  g.kernel = config[0];
  g.stride = config[1];
  g.dilation = config[2];
  q->num_heads = config[3];
  q->layout = config[4];
  if (g.kernel < 1 || g.kernel % 2 == 0 || g.stride < 1 || g.dilation < 1 || q->num_heads < 1) return false;
  if (q->layout != 0 && q->layout != 1) return false;
  q->batch = shapes[qkv_index][0];
  q->height = shapes[qkv_index][2];
  q->width = shapes[qkv_index][3];
  if (shapes[qkv_index][1] % (3 * q->num_heads) != 0) return false;
  g.dim = shapes[qkv_index][1] / (3 * q->num_heads);
  if (shapes[pe_index][0] != 1 || shapes[pe_index][1] != g.dim || shapes[pe_index][2] != q->height ||
      shapes[pe_index][3] != q->width)
    return false;
  g.heads = q->batch * q->num_heads;
  q->pad = static_cast<int64_t>(g.dilation) * (g.kernel - 1) / 2;
  g.out_h = (q->height + g.stride - 1) / g.stride;
  g.out_w = (q->width + g.stride - 1) / g.stride;
  g.pad_h = q->height + 2 * q->pad;
  g.pad_w = q->width + 2 * q->pad;
  return true;
}

// Per-head work of the qkv kernels, arranged so that every inner loop is one long contiguous run even on
// 4 x 4 maps and with stride 2 (the padded-interface kernels above loop over output rows of W' pixels):
// - the padded keys/values of a channel are stored as stride x stride phase planes, phase (a, b) holding
//   padded[a + s*r][b + s*t] (ph_h x ph_w each), so neighbour (u, v) of output pixel (i, j) is element
//   base[p] + i * ph_w + j of the channel's phase storage (base[p]: phase ((u*dil) % s, (v*dil) % s), row
//   (u*dil) / s, column (v*dil) / s);
// - per-pixel planes (query, logits/weights, output, gradients) are "extended": H' rows of ph_w >= W'
//   columns, the columns j >= W' zero (query, d out) or ignored, so "for every output pixel" is the single
//   run e < span = (H' - 1) * ph_w + W' and neighbour p of pixel e is base[p] + e.
struct PhaseLayout {
  int64_t stride, ph_h, ph_w, span;
  int64_t phase_plane() const { return ph_h * ph_w; }
  int64_t channel_size() const { return stride * stride * phase_plane(); }  // padded storage per channel
  std::vector<int64_t> base;  // per offset p
  PhaseLayout(const Geometry &g) : stride(g.stride) {
    ph_h = (g.pad_h + stride - 1) / stride;
    ph_w = (g.pad_w + stride - 1) / stride;
    span = (g.out_h - 1) * ph_w + g.out_w;
    base.resize(g.offsets());
    for (int64_t p = 0; p < g.offsets(); ++p) {
      const int64_t row = (p / g.kernel) * g.dilation, col = (p % g.kernel) * g.dilation;
      base[p] = ((row % stride) * stride + col % stride) * phase_plane() + (row / stride) * ph_w + col / stride;
    }
  }
  int64_t ext_plane(const Geometry &g) const { return g.out_h * ph_w; }
};

// An (H, W) plane <-> the interior of a channel's phase storage zero-padded by `pad` on every side (the
// border is never touched): row by row and phase by phase, so every inner loop is one run of a row (contiguous
// for stride 1) instead of one index-table lookup per pixel.
template <bool ToPhase>
void copy_interior(const PhaseLayout &l, int64_t height, int64_t width, int64_t pad, const float *from, float *to) {
  const int64_t s = l.stride;
  for (int64_t r = 0; r < height; ++r) {
    const int64_t row = r + pad, row_base = (row % s) * s * l.phase_plane() + (row / s) * l.ph_w;
    for (int64_t a = 0; a < s; ++a) {
      const int64_t first = pad + ((a - pad % s) % s + s) % s;  // first padded column >= pad of phase a
      if (first >= pad + width) continue;
      const int64_t count = (pad + width - first + s - 1) / s;
      const int64_t phase_at = row_base + a * l.phase_plane() + first / s, plane_at = r * width + (first - pad);
      if (ToPhase) {
        const float *__restrict src = from + plane_at;
        float *__restrict dst = to + phase_at;
        for (int64_t i = 0; i < count; ++i) dst[i] = src[i * s];
      } else {
        const float *__restrict src = from + phase_at;
        float *__restrict dst = to + plane_at;
        for (int64_t i = 0; i < count; ++i) dst[i * s] = src[i];
      }
    }
  }
}

// exp(x) for x <= 0 (softmax after subtracting the maximum), branch-free so the loops vectorise: Cephes expf
// (range reduction by ln 2 in two parts, degree-6 polynomial), relative error about 1e-7 (float round-off).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(std::fma(x, 1.44269504088896341f, 0.5f));
  x = std::fma(n, 2.12194440e-4f, std::fma(-n, 0.693359375f, x));
  const float z = x * x;
  float y = 1.9875691500e-4f;
  y = std::fma(y, x, 1.3981999507e-3f);
  y = std::fma(y, x, 8.3334519073e-3f);
  y = std::fma(y, x, 4.1665795894e-2f);
  y = std::fma(y, x, 1.6666665459e-1f);
  y = std::fma(y, x, 5.0000001201e-1f);
  y = std::fma(y, z, x) + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
  return y * __builtin_bit_cast(float, bits);
}

// Thread-local scratch of one head: extended query, phase-plane keys - pe and values, index tables.
struct HeadScratch {
  PhaseLayout layout;
  std::vector<float> query, key_pad, value_pad;
  std::vector<int64_t> rows, cols;  // reflected source row / column of every padded row / column
  std::vector<int64_t> row_at, col_at;  // where padded row r / column t starts / sits in the phase storage
  HeadScratch(const QKVGeometry &q)
      : layout(q.g), query(q.g.dim * layout.ext_plane(q.g)), key_pad(q.g.dim * layout.channel_size(), 0.0f),
        value_pad(q.g.dim * layout.channel_size(), 0.0f), rows(q.g.pad_h), cols(q.g.pad_w), row_at(q.g.pad_h),
        col_at(q.g.pad_w) {
    const int64_t s = layout.stride;
    for (int64_t t = 0; t < q.g.pad_h; ++t) {
      rows[t] = reflect_index(t - q.pad, q.height) * q.width;
      row_at[t] = (t % s) * s * layout.phase_plane() + (t / s) * layout.ph_w;
    }
    for (int64_t t = 0; t < q.g.pad_w; ++t) {
      cols[t] = reflect_index(t - q.pad, q.width);
      col_at[t] = (t % s) * layout.phase_plane() + t / s;
    }
  }
};

// The columns t in [pad, pad + W) of a padded row hold source column t - pad; in the phase storage the ones of
// phase a (t % s == a) are consecutive from column a * phase_plane + t / s. interior_run(q, s, a) gives the
// first such t and how many there are, so the interior is copied run by run (contiguous for stride 1) and
// only the reflected border columns go through the index tables.
struct InteriorRun {
  int64_t first, count;
};

InteriorRun interior_run(const QKVGeometry &q, int64_t stride, int64_t phase) {
  int64_t first = q.pad + ((phase - q.pad % stride) % stride + stride) % stride;
  const int64_t end = q.pad + q.width;
  return {first, first < end ? (end - first + stride - 1) / stride : 0};
}

// dst (phase storage of one channel) = reflection padding of src (H, W) (minus sub (H, W) if given).
void pad_plane(const QKVGeometry &q, const HeadScratch &s, const float *src, const float *sub, float *dst) {
  const int64_t *cols = s.cols.data(), *col_at = s.col_at.data(), stride = s.layout.stride;
  for (int64_t r = 0; r < q.g.pad_h; ++r) {
    const float *__restrict src_row = src + s.rows[r];
    const float *__restrict sub_row = sub == nullptr ? nullptr : sub + s.rows[r];
    float *__restrict dst_row = dst + s.row_at[r];
    for (int64_t t = 0; t < q.g.pad_w; ++t) {  // the reflected borders
      if (t == q.pad) t = q.pad + q.width;
      if (t >= q.g.pad_w) break;
      dst_row[col_at[t]] = sub_row == nullptr ? src_row[cols[t]] : src_row[cols[t]] - sub_row[cols[t]];
    }
    for (int64_t a = 0; a < stride; ++a) {
      const InteriorRun run = interior_run(q, stride, a);
      float *__restrict to = dst_row + col_at[run.first];
      const float *__restrict from = src_row + (run.first - q.pad);
      if (stride == 1 && sub_row != nullptr) {
        const float *__restrict minus = sub_row + (run.first - q.pad);
        for (int64_t i = 0; i < run.count; ++i) to[i] = from[i] - minus[i];
      } else if (stride == 1) {
        std::copy(from, from + run.count, to);
      } else if (sub_row != nullptr) {
        const float *__restrict minus = sub_row + (run.first - q.pad);
        for (int64_t i = 0; i < run.count; ++i) to[i] = from[i * stride] - minus[i * stride];
      } else {
        for (int64_t i = 0; i < run.count; ++i) to[i] = from[i * stride];
      }
    }
  }
}

// dst (H, W) += the reflection padding's adjoint of src (phase storage of one channel).
void fold_plane(const QKVGeometry &q, const HeadScratch &s, const float *src, float *dst) {
  const int64_t *cols = s.cols.data(), *col_at = s.col_at.data(), stride = s.layout.stride;
  for (int64_t r = 0; r < q.g.pad_h; ++r) {
    float *__restrict dst_row = dst + s.rows[r];
    const float *__restrict src_row = src + s.row_at[r];
    for (int64_t a = 0; a < stride; ++a) {
      const InteriorRun run = interior_run(q, stride, a);
      const float *__restrict from = src_row + col_at[run.first];
      float *__restrict to = dst_row + (run.first - q.pad);
      if (stride == 1) {
        for (int64_t i = 0; i < run.count; ++i) to[i] += from[i];
      } else {
        for (int64_t i = 0; i < run.count; ++i) to[i * stride] += from[i];
      }
    }
    for (int64_t t = 0; t < q.g.pad_w; ++t) {  // the reflected borders
      if (t == q.pad) t = q.pad + q.width;
      if (t >= q.g.pad_w) break;
      dst_row[cols[t]] += src_row[col_at[t]];
    }
  }
}

// extended (H' x ph_w, zero beyond W') <-> compact (H' x W') planes
void expand(const Geometry &g, const PhaseLayout &l, const float *compact, float *extended) {
  for (int64_t i = 0; i < g.out_h; ++i) {
    std::copy(compact + i * g.out_w, compact + (i + 1) * g.out_w, extended + i * l.ph_w);
    std::fill(extended + i * l.ph_w + g.out_w, extended + (i + 1) * l.ph_w, 0.0f);
  }
}

void compact(const Geometry &g, const PhaseLayout &l, const float *extended, float *out) {
  for (int64_t i = 0; i < g.out_h; ++i) std::copy(extended + i * l.ph_w, extended + i * l.ph_w + g.out_w, out + i * g.out_w);
}

// Fills the scratch of head b (image b / N, head b % N).
void load_head(const QKVGeometry &q, const float *qkv, const float *pe, int64_t b, float scale, HeadScratch *s) {
  const Geometry &g = q.g;
  const PhaseLayout &l = s->layout;
  const int64_t image = b / q.num_heads, head = b % q.num_heads;
  for (int64_t j = 0; j < g.dim; ++j) {
    const float *query = qkv + q.qkv_plane(image, head, j);
    float *dst = s->query.data() + j * l.ext_plane(g);
    for (int64_t i = 0; i < g.out_h; ++i) {
      const float *row = query + i * g.stride * q.width;
      float *dst_row = dst + i * l.ph_w;
      for (int64_t x = 0; x < g.out_w; ++x) dst_row[x] = row[x * g.stride] * scale;
      std::fill(dst_row + g.out_w, dst_row + l.ph_w, 0.0f);
    }
    pad_plane(q, *s, qkv + q.qkv_plane(image, q.num_heads + head, j), pe + j * q.plane(),
              s->key_pad.data() + j * l.channel_size());
    pad_plane(q, *s, qkv + q.qkv_plane(image, 2 * q.num_heads + head, j), nullptr,
              s->value_pad.data() + j * l.channel_size());
  }
}

// The three products below walk the run e < span in steps of 8 (AVX2), holding 4 accumulators in registers
// (4 offsets or 4 channels at a time) so that each vector loaded serves 4 multiply-adds and no partial sum
// goes through memory; the last span % 8 pixels (and everything without AVX2) take the plain loops.

// acc[p][e] = sum_c a[c][e] * padded[c][base[p] + e]   (extended planes; acc overwritten, zero beyond the run)
void correlate_ext(const Geometry &g, const PhaseLayout &l, const float *a, const float *padded, float *acc) {
  const int64_t ext = l.ext_plane(g), n = l.span, taps = g.offsets(), dim = g.dim, cs = l.channel_size();
  const int64_t *base = l.base.data();
  int64_t e0 = 0;
#ifdef __AVX2__
  for (; e0 + 8 <= n; e0 += 8) {
    int64_t p = 0;
    for (; p + 4 <= taps; p += 4) {
      __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
      for (int64_t c = 0; c < dim; ++c) {
        const __m256 av = _mm256_loadu_ps(a + c * ext + e0);
        const float *src = padded + c * cs + e0;
        s0 = _mm256_fmadd_ps(av, _mm256_loadu_ps(src + base[p]), s0);
        s1 = _mm256_fmadd_ps(av, _mm256_loadu_ps(src + base[p + 1]), s1);
        s2 = _mm256_fmadd_ps(av, _mm256_loadu_ps(src + base[p + 2]), s2);
        s3 = _mm256_fmadd_ps(av, _mm256_loadu_ps(src + base[p + 3]), s3);
      }
      _mm256_storeu_ps(acc + p * ext + e0, s0);
      _mm256_storeu_ps(acc + (p + 1) * ext + e0, s1);
      _mm256_storeu_ps(acc + (p + 2) * ext + e0, s2);
      _mm256_storeu_ps(acc + (p + 3) * ext + e0, s3);
    }
    for (; p < taps; ++p) {
      __m256 s0 = _mm256_setzero_ps();
      for (int64_t c = 0; c < dim; ++c) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + c * ext + e0), _mm256_loadu_ps(padded + c * cs + e0 + base[p]), s0);
      }
      _mm256_storeu_ps(acc + p * ext + e0, s0);
    }
  }
#endif
  for (int64_t p = 0; p < taps; ++p) {
    float *__restrict acc_p = acc + p * ext;
    std::fill(acc_p + e0, acc_p + ext, 0.0f);
    for (int64_t c = 0; c < dim; ++c) {
      const float *__restrict a_c = a + c * ext;
      const float *__restrict src = padded + c * cs + base[p];
      for (int64_t e = e0; e < n; ++e) acc_p[e] += a_c[e] * src[e];
    }
  }
}

// out[c][e] = sum_p weights[p][e] * padded[c][base[p] + e]   (extended planes; out overwritten, zero beyond the run)
void gather_ext(const Geometry &g, const PhaseLayout &l, const float *weights, const float *padded, float *out) {
  const int64_t ext = l.ext_plane(g), n = l.span, taps = g.offsets(), dim = g.dim, cs = l.channel_size();
  const int64_t *base = l.base.data();
  int64_t e0 = 0;
#ifdef __AVX2__
  for (; e0 + 8 <= n; e0 += 8) {
    int64_t c = 0;
    for (; c + 4 <= dim; c += 4) {
      __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
      const float *src = padded + c * cs + e0;
      for (int64_t p = 0; p < taps; ++p) {
        const __m256 wv = _mm256_loadu_ps(weights + p * ext + e0);
        const float *at = src + base[p];
        s0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(at), s0);
        s1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(at + cs), s1);
        s2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(at + 2 * cs), s2);
        s3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(at + 3 * cs), s3);
      }
      _mm256_storeu_ps(out + c * ext + e0, s0);
      _mm256_storeu_ps(out + (c + 1) * ext + e0, s1);
      _mm256_storeu_ps(out + (c + 2) * ext + e0, s2);
      _mm256_storeu_ps(out + (c + 3) * ext + e0, s3);
    }
    for (; c < dim; ++c) {
      __m256 s0 = _mm256_setzero_ps();
      for (int64_t p = 0; p < taps; ++p) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(weights + p * ext + e0), _mm256_loadu_ps(padded + c * cs + e0 + base[p]), s0);
      }
      _mm256_storeu_ps(out + c * ext + e0, s0);
    }
  }
#endif
  for (int64_t c = 0; c < dim; ++c) {
    float *__restrict out_c = out + c * ext;
    std::fill(out_c + e0, out_c + ext, 0.0f);
    const float *pad_c = padded + c * cs;
    for (int64_t p = 0; p < taps; ++p) {
      const float *__restrict w_p = weights + p * ext;
      const float *__restrict src = pad_c + base[p];
      for (int64_t e = e0; e < n; ++e) out_c[e] += w_p[e] * src[e];
    }
  }
}

// grad[c][base[p] + e] += weights[p][e] * a[c][e]   (adjoint of gather_ext w.r.t. padded; grad overwritten).
// Offset by offset over the whole run: consecutive offsets write overlapping vectors, and walking them inside
// one 8-pixel step would stall every load on the store before it.
void scatter_ext(const Geometry &g, const PhaseLayout &l, const float *weights, const float *a, float *grad) {
  const int64_t ext = l.ext_plane(g), n = l.span;
  std::fill(grad, grad + g.dim * l.channel_size(), 0.0f);
  for (int64_t c = 0; c < g.dim; ++c) {
    const float *__restrict a_c = a + c * ext;
    float *grad_c = grad + c * l.channel_size();
    for (int64_t p = 0; p < g.offsets(); ++p) {
      const float *__restrict w_p = weights + p * ext;
      float *__restrict dst = grad_c + l.base[p];
      for (int64_t e = 0; e < n; ++e) dst[e] += w_p[e] * a_c[e];
    }
  }
}

#ifdef __AVX2__
// exp_nonpositive on 8 lanes (the same operations, so the same results as the scalar version).
inline __m256 exp_nonpositive8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, z, x), _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}
#endif

// plane[x] = exp(plane[x] - max[x]); sum[x] += plane[x]
void exp_accumulate(float *__restrict plane, const float *__restrict max, float *__restrict sum, int64_t n) {
  int64_t x = 0;
#ifdef __AVX2__
  for (; x + 8 <= n; x += 8) {
    const __m256 e = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(plane + x), _mm256_loadu_ps(max + x)));
    _mm256_storeu_ps(plane + x, e);
    _mm256_storeu_ps(sum + x, _mm256_add_ps(_mm256_loadu_ps(sum + x), e));
  }
#endif
  for (; x < n; ++x) {
    const float e = exp_nonpositive(plane[x] - max[x]);
    plane[x] = e;
    sum[x] += e;
  }
}

// In place over the k*k extended planes: logits -> softmax over p at every pixel.
void softmax_ext(const Geometry &g, const PhaseLayout &l, float *planes, float *scratch_max, float *scratch_sum) {
  const int64_t ext = l.ext_plane(g), n = l.span;
  std::copy(planes, planes + n, scratch_max);
  for (int64_t p = 1; p < g.offsets(); ++p) {
    const float *__restrict plane = planes + p * ext;
    for (int64_t x = 0; x < n; ++x) scratch_max[x] = std::max(scratch_max[x], plane[x]);
  }
  std::fill(scratch_sum, scratch_sum + n, 0.0f);
  for (int64_t p = 0; p < g.offsets(); ++p) exp_accumulate(planes + p * ext, scratch_max, scratch_sum, n);
  for (int64_t x = 0; x < n; ++x) scratch_sum[x] = 1.0f / scratch_sum[x];
  for (int64_t p = 0; p < g.offsets(); ++p) {
    float *__restrict plane = planes + p * ext;
    for (int64_t x = 0; x < n; ++x) plane[x] *= scratch_sum[x];
  }
}

// In place: d weights -> d logits over extended planes (columns beyond W' have zero weights, stay zero).
void softmax_backward_ext(const Geometry &g, const PhaseLayout &l, const float *weights, float *grad, float *total) {
  const int64_t ext = l.ext_plane(g), n = l.span;
  std::fill(total, total + n, 0.0f);
  for (int64_t p = 0; p < g.offsets(); ++p) {
    const float *__restrict w_p = weights + p * ext;
    const float *__restrict g_p = grad + p * ext;
    for (int64_t x = 0; x < n; ++x) total[x] += w_p[x] * g_p[x];
  }
  for (int64_t p = 0; p < g.offsets(); ++p) {
    const float *__restrict w_p = weights + p * ext;
    float *__restrict g_p = grad + p * ext;
    for (int64_t x = 0; x < n; ++x) g_p[x] = w_p[x] * (g_p[x] - total[x]);
  }
}

// sum_e a[e] * b[e] (8/16-lane partial sums where AVX2 is available)
inline float dot(const float *a, const float *b, int64_t n) {
  int64_t e = 0;
  float sum = 0.0f;
#ifdef __AVX2__
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; e + 16 <= n; e += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + e), _mm256_loadu_ps(b + e), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + e + 8), _mm256_loadu_ps(b + e + 8), acc1);
  }
  for (; e + 8 <= n; e += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + e), _mm256_loadu_ps(b + e), acc0);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(acc0, acc1));
  for (float lane : lanes) sum += lane;
#endif
  for (; e < n; ++e) sum += a[e] * b[e];
  return sum;
}

float query_scale(const Geometry &g) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(g.dim))); }

}  // namespace

extern "C" {

// Inputs: query, key_pad, value_pad, config. Outputs: out (BN, d, Ho, Wo), weights (BN, k*k, Ho, Wo).
int LocalAttentionForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 6) return 1;
  Geometry g;
  if (!read_geometry(shapes, ndims, dtypes, static_cast<const int32_t *>(params[3]), 0, 1, 0, 2, &g)) return 2;
  const float *query = static_cast<const float *>(params[0]);
  const float *key_pad = static_cast<const float *>(params[1]);
  const float *value_pad = static_cast<const float *>(params[2]);
  float *out = static_cast<float *>(params[4]);
  float *weights = static_cast<float *>(params[5]);
  acmix::parallel_for(g.heads, [&](int64_t first, int64_t last, int64_t) {
    std::vector<float> scratch(2 * g.out_plane());
    for (int64_t b = first; b < last; ++b) {
      float *weights_b = weights + b * g.offsets() * g.out_plane();
      std::fill(weights_b, weights_b + g.offsets() * g.out_plane(), 0.0f);
      correlate(g, query + b * g.dim * g.out_plane(), key_pad + b * g.dim * g.pad_plane(), weights_b);
      softmax_over_offsets(g, weights_b, scratch.data(), scratch.data() + g.out_plane());
      gather(g, weights_b, value_pad + b * g.dim * g.pad_plane(), out + b * g.dim * g.out_plane());
    }
  });
  return 0;
}

// Inputs: grad_out, weights, query, key_pad, value_pad, config.
// Outputs: grad_query (BN, d, Ho, Wo), grad_key_pad, grad_value_pad (BN, d, Hp, Wp).
int LocalAttentionBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 9) return 1;
  Geometry g;
  if (!read_geometry(shapes, ndims, dtypes, static_cast<const int32_t *>(params[5]), 2, 3, 0, 4, &g)) return 2;
  const float *grad_out = static_cast<const float *>(params[0]);
  const float *weights = static_cast<const float *>(params[1]);
  const float *query = static_cast<const float *>(params[2]);
  const float *key_pad = static_cast<const float *>(params[3]);
  const float *value_pad = static_cast<const float *>(params[4]);
  float *grad_query = static_cast<float *>(params[6]);
  float *grad_key_pad = static_cast<float *>(params[7]);
  float *grad_value_pad = static_cast<float *>(params[8]);
  const int64_t n = g.out_plane();
  acmix::parallel_for(g.heads, [&](int64_t first, int64_t last, int64_t) {
    std::vector<float> grad_logits(g.offsets() * n);
    std::vector<float> total(n);
    for (int64_t b = first; b < last; ++b) {
      const float *weights_b = weights + b * g.offsets() * n;
      const float *grad_out_b = grad_out + b * g.dim * n;
      const float *query_b = query + b * g.dim * n;
      // d loss / d weights[p] = grad_out . value neighbour p; then through the softmax:
      // d loss / d logits[p] = A_p * (dA_p - sum_q A_q dA_q)
      std::fill(grad_logits.begin(), grad_logits.end(), 0.0f);
      correlate(g, grad_out_b, value_pad + b * g.dim * g.pad_plane(), grad_logits.data());
      softmax_backward(g, weights_b, grad_logits.data(), total.data());
      gather(g, grad_logits.data(), key_pad + b * g.dim * g.pad_plane(), grad_query + b * g.dim * n);
      scatter(g, grad_logits.data(), query_b, grad_key_pad + b * g.dim * g.pad_plane());
      scatter(g, weights_b, grad_out_b, grad_value_pad + b * g.dim * g.pad_plane());
    }
  });
  return 0;
}

// The attention weights the forward keeps for the backward, in the extended layout of the per-head scratch
// (no copy to and from the compact (Ho, Wo) layout): (B * N, k*k, Ho * ph_w); columns j >= Wo hold finite
// values that the backward multiplies by zero gradients only.
bool weights_shape_ok(const QKVGeometry &q, int ndim, const int64_t *shape) {
  const PhaseLayout l(q.g);
  return ndim == 3 && shape[0] == q.g.heads && shape[1] == q.g.offsets() && shape[2] == l.ext_plane(q.g);
}

// Inputs: qkv (B, 3C, H, W), pe (1, d, H, W), config (5,). Outputs: out (B, C, Ho, Wo) with channel n * d + j
// (head n, channel j), weights (B * N, k*k, Ho * ph_w) (weights_shape_ok).
int LocalAttentionQKVForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 5) return 1;
  QKVGeometry q;
  if (!read_qkv_geometry(shapes, ndims, dtypes, static_cast<const int32_t *>(params[2]), 0, 1, 0, 1, &q)) return 2;
  if (!weights_shape_ok(q, ndims[4], shapes[4])) return 2;
  const Geometry &g = q.g;
  const float *qkv = static_cast<const float *>(params[0]);
  const float *pe = static_cast<const float *>(params[1]);
  float *out = static_cast<float *>(params[3]);
  float *weights = static_cast<float *>(params[4]);
  const float scale = query_scale(g);
  acmix::parallel_for(g.heads, [&](int64_t first, int64_t last, int64_t) {
    HeadScratch s(q);
    const PhaseLayout &l = s.layout;
    const int64_t ext = l.ext_plane(g), n = g.out_plane();
    std::vector<float> out_ext(g.dim * ext), scratch(2 * ext);
    for (int64_t b = first; b < last; ++b) {
      float *logits = weights + b * g.offsets() * ext;  // softmax in place: the weights in the extended layout
      load_head(q, qkv, pe, b, scale, &s);
      correlate_ext(g, l, s.query.data(), s.key_pad.data(), logits);
      softmax_ext(g, l, logits, scratch.data(), scratch.data() + ext);
      gather_ext(g, l, logits, s.value_pad.data(), out_ext.data());
      float *out_b = out + b * g.dim * n;
      for (int64_t c = 0; c < g.dim; ++c) compact(g, l, out_ext.data() + c * ext, out_b + c * n);
    }
  });
  return 0;
}

// Inputs: grad_out (B, C, Ho, Wo), weights, qkv, pe, config. Outputs: grad_qkv (B, 3C, H, W), grad_pe (1, d, H, W).
int LocalAttentionQKVBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 7) return 1;
  QKVGeometry q;
  if (!read_qkv_geometry(shapes, ndims, dtypes, static_cast<const int32_t *>(params[4]), 0, 3, 2, 3, &q)) return 2;
  if (!is_float32(dtypes[1]) || !weights_shape_ok(q, ndims[1], shapes[1])) return 2;
  const Geometry &g = q.g;
  const float *grad_out = static_cast<const float *>(params[0]);
  const float *weights = static_cast<const float *>(params[1]);
  const float *qkv = static_cast<const float *>(params[2]);
  const float *pe = static_cast<const float *>(params[3]);
  float *grad_qkv = static_cast<float *>(params[5]);
  float *grad_pe = static_cast<float *>(params[6]);
  const float scale = query_scale(g);
  const int64_t n = g.out_plane(), plane = q.plane();
  const int64_t chunks = acmix::num_chunks(g.heads);  // per-chunk partial d pe, added in chunk order
  std::vector<float> grad_pe_parts(static_cast<size_t>(chunks) * g.dim * plane, 0.0f);
  acmix::parallel_for(g.heads, [&](int64_t first, int64_t last, int64_t chunk) {
    HeadScratch s(q);
    const PhaseLayout &l = s.layout;
    const int64_t ext = l.ext_plane(g);
    std::vector<float> grad_logits(g.offsets() * ext), total(ext);
    std::vector<float> grad_out_ext(g.dim * ext), grad_query(g.dim * ext), grad_pad(g.dim * l.channel_size());
    float *grad_pe_part = grad_pe_parts.data() + static_cast<size_t>(chunk) * g.dim * plane;
    for (int64_t b = first; b < last; ++b) {
      const int64_t image = b / q.num_heads, head = b % q.num_heads;
      load_head(q, qkv, pe, b, scale, &s);
      const float *weights_ext = weights + b * g.offsets() * ext;
      for (int64_t c = 0; c < g.dim; ++c) expand(g, l, grad_out + (b * g.dim + c) * n, grad_out_ext.data() + c * ext);
      // d loss / d weights[p] = d out . value neighbour p; then through the softmax
      correlate_ext(g, l, grad_out_ext.data(), s.value_pad.data(), grad_logits.data());
      softmax_backward_ext(g, l, weights_ext, grad_logits.data(), total.data());
      // query: d scaled strided query, back to the strided pixels (the others get 0)
      gather_ext(g, l, grad_logits.data(), s.key_pad.data(), grad_query.data());
      for (int64_t j = 0; j < g.dim; ++j) {
        float *dst = grad_qkv + q.qkv_plane(image, head, j);
        std::fill(dst, dst + plane, 0.0f);
        const float *src = grad_query.data() + j * ext;
        for (int64_t i = 0; i < g.out_h; ++i) {
          for (int64_t x = 0; x < g.out_w; ++x) dst[i * g.stride * q.width + x * g.stride] = src[i * l.ph_w + x] * scale;
        }
      }
      // keys (and -pe): fold the padded gradient back
      scatter_ext(g, l, grad_logits.data(), s.query.data(), grad_pad.data());
      for (int64_t j = 0; j < g.dim; ++j) {
        float *dst = grad_qkv + q.qkv_plane(image, q.num_heads + head, j);
        std::fill(dst, dst + plane, 0.0f);
        fold_plane(q, s, grad_pad.data() + j * l.channel_size(), dst);
        float *pe_j = grad_pe_part + j * plane;
        for (int64_t x = 0; x < plane; ++x) pe_j[x] -= dst[x];
      }
      // values
      scatter_ext(g, l, weights_ext, grad_out_ext.data(), grad_pad.data());
      for (int64_t j = 0; j < g.dim; ++j) {
        float *dst = grad_qkv + q.qkv_plane(image, 2 * q.num_heads + head, j);
        std::fill(dst, dst + plane, 0.0f);
        fold_plane(q, s, grad_pad.data() + j * l.channel_size(), dst);
      }
    }
  });
  std::fill(grad_pe, grad_pe + g.dim * plane, 0.0f);
  for (int64_t w = 0; w < chunks; ++w) {
    const float *part = grad_pe_parts.data() + static_cast<size_t>(w) * g.dim * plane;
    for (int64_t x = 0; x < g.dim * plane; ++x) grad_pe[x] += part[x];
  }
  return 0;
}

}  // extern "C"

// ---- the conv path's group convolution: filter gradient --------------------------------------------------
// MindSpore's CPU Conv2DBackpropFilter for a group convolution (ACmix's conv path: groups = d, a few input
// channels per group) is one of the slowest ops of a training step, and degrades badly when the machine is
// loaded. This is its replacement for acmix_ms.kernels.conv_path_cpu.CpuGroupConv: every group j is one task
// (no reduction between threads), its zero-padded inputs in the phase layout of the attention kernels, and each
// weight entry one contiguous dot product per image.
//
// Inputs: grad_out (B, C, Ho, Wo), x (B, d*G, H, W) (group j = channels j*G .. j*G + G - 1), config int32 (3,):
// kernel_size, stride, groups d; zero padding kernel_size / 2 ("same" for odd kernels). Output: grad_weight
// (C, G, k, k) (output channel o = j * (C/d) + m belongs to group j).
extern "C" int GroupConvFilterGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                   void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 4) return 1;
  if (!is_float32(dtypes[0]) || !is_float32(dtypes[1]) || !is_float32(dtypes[3])) return 2;
  if (ndims[0] != 4 || ndims[1] != 4 || ndims[3] != 4) return 2;
  const int32_t *config = static_cast<const int32_t *>(params[2]);
  const int64_t batch = shapes[1][0], height = shapes[1][2], width = shapes[1][3];
  const int64_t channels = shapes[0][1], groups = config[2];
  if (config[0] < 1 || config[0] % 2 == 0 || config[1] < 1 || groups < 1) return 2;
  if (channels % groups != 0 || shapes[1][1] % groups != 0 || shapes[0][0] != batch) return 2;
  const int64_t per_group_out = channels / groups, per_group_in = shapes[1][1] / groups, pad = config[0] / 2;
  Geometry g;
  g.kernel = config[0];
  g.stride = config[1];
  g.dilation = 1;
  g.dim = per_group_in;
  g.heads = groups;
  g.out_h = shapes[0][2];
  g.out_w = shapes[0][3];
  g.pad_h = height + 2 * pad;
  g.pad_w = width + 2 * pad;
  if ((g.out_h - 1) * g.stride + g.kernel > g.pad_h || (g.out_w - 1) * g.stride + g.kernel > g.pad_w) return 2;
  if (shapes[3][0] != channels || shapes[3][1] != per_group_in || shapes[3][2] != g.kernel || shapes[3][3] != g.kernel)
    return 2;
  const float *grad_out = static_cast<const float *>(params[0]);
  const float *x = static_cast<const float *>(params[1]);
  float *grad_weight = static_cast<float *>(params[3]);
  const PhaseLayout l(g);
  const int64_t ext = l.ext_plane(g), n = g.out_plane(), plane = height * width, taps = g.offsets();
  acmix::parallel_for(groups, [&](int64_t first, int64_t last, int64_t) {
    std::vector<float> padded(per_group_in * l.channel_size(), 0.0f), grad_ext(per_group_out * ext);
    for (int64_t j = first; j < last; ++j) {
      float *dw = grad_weight + j * per_group_out * per_group_in * taps;
      std::fill(dw, dw + per_group_out * per_group_in * taps, 0.0f);
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t c = 0; c < per_group_in; ++c) {
          const float *src = x + (b * groups * per_group_in + j * per_group_in + c) * plane;
          float *dst = padded.data() + c * l.channel_size();
          copy_interior<true>(l, height, width, pad, src, dst);
        }
        for (int64_t m = 0; m < per_group_out; ++m) {
          expand(g, l, grad_out + (b * channels + j * per_group_out + m) * n, grad_ext.data() + m * ext);
        }
        for (int64_t m = 0; m < per_group_out; ++m) {
          const float *__restrict go = grad_ext.data() + m * ext;
          for (int64_t c = 0; c < per_group_in; ++c) {
            const float *pad_c = padded.data() + c * l.channel_size();
            float *dw_mc = dw + (m * per_group_in + c) * taps;
            for (int64_t p = 0; p < taps; ++p) {
              const float *__restrict src = pad_c + l.base[p];
              dw_mc[p] += dot(go, src, l.span);
            }
          }
        }
      }
    }
  });
  return 0;
}

// ---- the conv path's group convolution: forward and input gradient ----------------------------------------
// MindSpore's CPU Conv2D / Conv2DBackpropInput for ACmix's group convolution (groups = d, G = 3N input and N
// output channels per group, k x k) run far below the speed of a dense convolution of the same size. Here
// every (image, group) pair is one task: its G inputs zero-padded into the phase layout of the attention
// kernels, so each of the k*k taps of every output pixel is one contiguous run, and the N outputs of the group
// are accumulated 4 at a time in registers (each input vector loaded once for 4 outputs).
namespace {

struct GroupConvGeometry {
  Geometry g;  // dim = G (inputs per group), heads = d (groups), out/pad sizes
  int64_t batch, height, width, pad, per_group_out;
  int64_t plane() const { return height * width; }
};

// Reads (kernel, stride, groups) and the shapes of x (B, d*G, H, W) and the output/grad_out (B, C, Ho, Wo).
bool read_group_conv(const int32_t *config, const int64_t *x_shape, const int64_t *out_shape,
                     const int64_t *weight_shape, GroupConvGeometry *c) {
  Geometry &g = c->g;
  g.kernel = config[0];
  g.stride = config[1];
  g.dilation = 1;
  const int64_t groups = config[2];
  if (g.kernel < 1 || g.kernel % 2 == 0 || g.stride < 1 || groups < 1) return false;
  if (x_shape[1] % groups != 0 || out_shape[1] % groups != 0 || x_shape[0] != out_shape[0]) return false;
  c->batch = x_shape[0];
  c->height = x_shape[2];
  c->width = x_shape[3];
  c->pad = g.kernel / 2;
  c->per_group_out = out_shape[1] / groups;
  g.heads = groups;
  g.dim = x_shape[1] / groups;
  g.out_h = (c->height + g.stride - 1) / g.stride;
  g.out_w = (c->width + g.stride - 1) / g.stride;
  g.pad_h = c->height + 2 * c->pad;
  g.pad_w = c->width + 2 * c->pad;
  if (out_shape[2] != g.out_h || out_shape[3] != g.out_w) return false;
  return weight_shape[0] == out_shape[1] && weight_shape[1] == g.dim && weight_shape[2] == g.kernel &&
         weight_shape[3] == g.kernel;
}

constexpr int64_t kLanes = 8;  // floats per vector step; runs are rounded up to it (buffers have the slack)

inline int64_t round_up(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// out[m][e] = sum_{c, p} w[(c * taps + p) * 4 + m] * padded[c][base[p] + e] for m < 4, e < n (n: multiple of 8)
void conv_block4(const float *padded, int64_t channel_size, int64_t channels, const std::vector<int64_t> &base,
                 const float *w, int64_t n, int64_t out_stride, float *out) {
  const int64_t taps = static_cast<int64_t>(base.size());
  for (int64_t e = 0; e < n; e += kLanes) {
#ifdef __AVX2__
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    const float *wp = w;
    for (int64_t c = 0; c < channels; ++c) {
      const float *src_c = padded + c * channel_size + e;
      for (int64_t p = 0; p < taps; ++p, wp += 4) {
        const __m256 s = _mm256_loadu_ps(src_c + base[p]);
        a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(wp), s, a0);
        a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(wp + 1), s, a1);
        a2 = _mm256_fmadd_ps(_mm256_broadcast_ss(wp + 2), s, a2);
        a3 = _mm256_fmadd_ps(_mm256_broadcast_ss(wp + 3), s, a3);
      }
    }
    _mm256_storeu_ps(out + e, a0);
    _mm256_storeu_ps(out + out_stride + e, a1);
    _mm256_storeu_ps(out + 2 * out_stride + e, a2);
    _mm256_storeu_ps(out + 3 * out_stride + e, a3);
#else
    float acc[4][kLanes] = {};
    const float *wp = w;
    for (int64_t c = 0; c < channels; ++c) {
      const float *src_c = padded + c * channel_size + e;
      for (int64_t p = 0; p < taps; ++p, wp += 4) {
        const float *s = src_c + base[p];
        for (int m = 0; m < 4; ++m) {
          for (int64_t x = 0; x < kLanes; ++x) acc[m][x] += wp[m] * s[x];
        }
      }
    }
    for (int m = 0; m < 4; ++m) std::copy(acc[m], acc[m] + kLanes, out + m * out_stride + e);
#endif
  }
}

// grad[c][base[p] + e] += sum_m w[(c * taps + p) * 4 + m] * dout[m][e] for m < 4, e < n (n: multiple of 8)
void conv_block4_adjoint(const float *dout, int64_t dout_stride, const float *w, int64_t channels,
                         const std::vector<int64_t> &base, int64_t n, int64_t channel_size, float *grad) {
  const int64_t taps = static_cast<int64_t>(base.size());
  const float *wp = w;
  for (int64_t c = 0; c < channels; ++c) {
    float *grad_c = grad + c * channel_size;
    for (int64_t p = 0; p < taps; ++p, wp += 4) {
      float *dst = grad_c + base[p];
#ifdef __AVX2__
      const __m256 w0 = _mm256_broadcast_ss(wp), w1 = _mm256_broadcast_ss(wp + 1);
      const __m256 w2 = _mm256_broadcast_ss(wp + 2), w3 = _mm256_broadcast_ss(wp + 3);
      for (int64_t e = 0; e < n; e += kLanes) {
        __m256 acc = _mm256_loadu_ps(dst + e);
        acc = _mm256_fmadd_ps(w0, _mm256_loadu_ps(dout + e), acc);
        acc = _mm256_fmadd_ps(w1, _mm256_loadu_ps(dout + dout_stride + e), acc);
        acc = _mm256_fmadd_ps(w2, _mm256_loadu_ps(dout + 2 * dout_stride + e), acc);
        acc = _mm256_fmadd_ps(w3, _mm256_loadu_ps(dout + 3 * dout_stride + e), acc);
        _mm256_storeu_ps(dst + e, acc);
      }
#else
      for (int64_t e = 0; e < n; ++e) {
        dst[e] += wp[0] * dout[e] + wp[1] * dout[dout_stride + e] + wp[2] * dout[2 * dout_stride + e] +
                  wp[3] * dout[3 * dout_stride + e];
      }
#endif
    }
  }
}

// The weights of outputs first .. first + 3 of group j as [(c * taps + p) * 4 + m] (zero for m >= count).
void pack_weights(const float *weight, const GroupConvGeometry &c, int64_t j, int64_t first, float *packed) {
  const int64_t taps = c.g.offsets(), per_in = c.g.dim;
  for (int64_t m = 0; m < 4; ++m) {
    const int64_t o = j * c.per_group_out + first + m;
    const bool valid = first + m < c.per_group_out;
    for (int64_t ci = 0; ci < per_in; ++ci) {
      for (int64_t p = 0; p < taps; ++p) {
        packed[(ci * taps + p) * 4 + m] = valid ? weight[(o * per_in + ci) * taps + p] : 0.0f;
      }
    }
  }
}

}  // namespace

extern "C" {

// Inputs: x (B, d*G, H, W), weight (C, G, k, k), config int32 (3,): kernel_size, stride, groups d.
// Output: out (B, C, Ho, Wo) = zero-padded ('same') group convolution, output o = j * (C/d) + m in group j.
int GroupConvForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                     void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 4) return 1;
  if (!is_float32(dtypes[0]) || !is_float32(dtypes[1]) || !is_float32(dtypes[3])) return 2;
  if (ndims[0] != 4 || ndims[1] != 4 || ndims[3] != 4) return 2;
  GroupConvGeometry c;
  if (!read_group_conv(static_cast<const int32_t *>(params[2]), shapes[0], shapes[3], shapes[1], &c)) return 2;
  const Geometry &g = c.g;
  const float *x = static_cast<const float *>(params[0]);
  const float *weight = static_cast<const float *>(params[1]);
  float *out = static_cast<float *>(params[3]);
  const PhaseLayout l(g);
  const int64_t n = round_up(l.span), ext = std::max(n, l.ext_plane(g)), out_plane = g.out_plane();
  const int64_t taps = g.offsets(), per_in = g.dim, per_out = c.per_group_out;
  acmix::parallel_for(c.batch * g.heads, [&](int64_t first, int64_t last, int64_t) {
    std::vector<float> padded(per_in * l.channel_size() + kLanes, 0.0f), out_ext(4 * ext);
    std::vector<float> packed(per_in * taps * 4);
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task / g.heads, j = task % g.heads;
      for (int64_t ci = 0; ci < per_in; ++ci) {
        const float *src = x + ((b * g.heads + j) * per_in + ci) * c.plane();
        float *dst = padded.data() + ci * l.channel_size();
        copy_interior<true>(l, c.height, c.width, c.pad, src, dst);
      }
      for (int64_t m0 = 0; m0 < per_out; m0 += 4) {
        pack_weights(weight, c, j, m0, packed.data());
        conv_block4(padded.data(), l.channel_size(), per_in, l.base, packed.data(), n, ext, out_ext.data());
        for (int64_t m = m0; m < std::min(per_out, m0 + 4); ++m) {
          compact(g, l, out_ext.data() + (m - m0) * ext, out + (b * g.heads * per_out + j * per_out + m) * out_plane);
        }
      }
    }
  });
  return 0;
}

// Inputs: grad_out (B, C, Ho, Wo), weight (C, G, k, k), x (B, d*G, H, W) (only its shape is read), config.
// Output: grad_x (B, d*G, H, W), the adjoint of GroupConvForward with respect to x.
int GroupConvInputGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                       void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 5) return 1;
  if (!is_float32(dtypes[0]) || !is_float32(dtypes[1]) || !is_float32(dtypes[4])) return 2;
  if (ndims[0] != 4 || ndims[1] != 4 || ndims[2] != 4 || ndims[4] != 4) return 2;
  GroupConvGeometry c;
  if (!read_group_conv(static_cast<const int32_t *>(params[3]), shapes[2], shapes[0], shapes[1], &c)) return 2;
  for (int t = 0; t < 4; ++t) {
    if (shapes[4][t] != shapes[2][t]) return 2;
  }
  const Geometry &g = c.g;
  const float *grad_out = static_cast<const float *>(params[0]);
  const float *weight = static_cast<const float *>(params[1]);
  float *grad_x = static_cast<float *>(params[4]);
  const PhaseLayout l(g);
  const int64_t n = round_up(l.span), ext = std::max(n, l.ext_plane(g)), out_plane = g.out_plane();
  const int64_t taps = g.offsets(), per_in = g.dim, per_out = c.per_group_out;
  acmix::parallel_for(c.batch * g.heads, [&](int64_t first, int64_t last, int64_t) {
    std::vector<float> grad_pad(per_in * l.channel_size() + kLanes), dout_ext(4 * ext, 0.0f);
    std::vector<float> packed(per_in * taps * 4);
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task / g.heads, j = task % g.heads;
      std::fill(grad_pad.begin(), grad_pad.end(), 0.0f);
      for (int64_t m0 = 0; m0 < per_out; m0 += 4) {
        pack_weights(weight, c, j, m0, packed.data());
        for (int64_t m = 0; m < 4; ++m) {
          float *dst = dout_ext.data() + m * ext;
          if (m0 + m < per_out) {
            expand(g, l, grad_out + (b * g.heads * per_out + j * per_out + m0 + m) * out_plane, dst);
          } else {
            std::fill(dst, dst + ext, 0.0f);
          }
        }
        conv_block4_adjoint(dout_ext.data(), ext, packed.data(), per_in, l.base, n, l.channel_size(), grad_pad.data());
      }
      for (int64_t ci = 0; ci < per_in; ++ci) {
        const float *src = grad_pad.data() + ci * l.channel_size();
        float *dst = grad_x + ((b * g.heads + j) * per_in + ci) * c.plane();
        copy_interior<false>(l, c.height, c.width, c.pad, src, dst);
      }
    }
  });
  return 0;
}

}  // extern "C"
