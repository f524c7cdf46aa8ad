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
#include <vector>

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

// Per-head scratch: strided scaled query (d, Ho, Wo), padded keys - pe and padded values (d, Hp, Wp).
struct HeadScratch {
  std::vector<float> query, key_pad, value_pad;
  std::vector<int64_t> rows, cols;  // reflected source row / column of every padded row / column
  explicit HeadScratch(const QKVGeometry &q)
      : query(q.g.dim * q.g.out_plane()), key_pad(q.g.dim * q.g.pad_plane()), value_pad(q.g.dim * q.g.pad_plane()),
        rows(q.g.pad_h), cols(q.g.pad_w) {
    for (int64_t t = 0; t < q.g.pad_h; ++t) rows[t] = reflect_index(t - q.pad, q.height);
    for (int64_t t = 0; t < q.g.pad_w; ++t) cols[t] = reflect_index(t - q.pad, q.width);
  }
};

// dst (Hp, Wp) = reflection padding of src (H, W) (minus sub (H, W) if given).
void pad_plane(const QKVGeometry &q, const HeadScratch &s, const float *src, const float *sub, float *dst) {
  for (int64_t r = 0; r < q.g.pad_h; ++r) {
    const float *src_row = src + s.rows[r] * q.width;
    float *dst_row = dst + r * q.g.pad_w;
    if (sub == nullptr) {
      for (int64_t t = 0; t < q.g.pad_w; ++t) dst_row[t] = src_row[s.cols[t]];
    } else {
      const float *sub_row = sub + s.rows[r] * q.width;
      for (int64_t t = 0; t < q.g.pad_w; ++t) dst_row[t] = src_row[s.cols[t]] - sub_row[s.cols[t]];
    }
  }
}

// dst (H, W) += the reflection padding's adjoint of src (Hp, Wp).
void fold_plane(const QKVGeometry &q, const HeadScratch &s, const float *src, float *dst) {
  for (int64_t r = 0; r < q.g.pad_h; ++r) {
    const float *src_row = src + r * q.g.pad_w;
    float *dst_row = dst + s.rows[r] * q.width;
    for (int64_t t = 0; t < q.g.pad_w; ++t) dst_row[s.cols[t]] += src_row[t];
  }
}

// Fills the scratch of head b (image b / N, head b % N).
void load_head(const QKVGeometry &q, const float *qkv, const float *pe, int64_t b, float scale, HeadScratch *s) {
  const Geometry &g = q.g;
  const int64_t image = b / q.num_heads, head = b % q.num_heads;
  for (int64_t j = 0; j < g.dim; ++j) {
    const float *query = qkv + q.qkv_plane(image, head, j);
    float *dst = s->query.data() + j * g.out_plane();
    for (int64_t i = 0; i < g.out_h; ++i) {
      const float *row = query + i * g.stride * q.width;
      for (int64_t x = 0; x < g.out_w; ++x) dst[i * g.out_w + x] = row[x * g.stride] * scale;
    }
    pad_plane(q, *s, qkv + q.qkv_plane(image, q.num_heads + head, j), pe + j * q.plane(),
              s->key_pad.data() + j * g.pad_plane());
    pad_plane(q, *s, qkv + q.qkv_plane(image, 2 * q.num_heads + head, j), nullptr,
              s->value_pad.data() + j * g.pad_plane());
  }
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
  acmix::parallel_for(g.heads, [&](int64_t first, int64_t last, int) {
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
  acmix::parallel_for(g.heads, [&](int64_t first, int64_t last, int) {
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

// Inputs: qkv (B, 3C, H, W), pe (1, d, H, W), config (5,). Outputs: out (B, C, Ho, Wo) with channel n * d + j
// (head n, channel j), weights (B * N, k*k, Ho, Wo).
int LocalAttentionQKVForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 5) return 1;
  QKVGeometry q;
  if (!read_qkv_geometry(shapes, ndims, dtypes, static_cast<const int32_t *>(params[2]), 0, 1, 0, 1, &q)) return 2;
  const Geometry &g = q.g;
  const float *qkv = static_cast<const float *>(params[0]);
  const float *pe = static_cast<const float *>(params[1]);
  float *out = static_cast<float *>(params[3]);
  float *weights = static_cast<float *>(params[4]);
  const float scale = query_scale(g);
  acmix::parallel_for(g.heads, [&](int64_t first, int64_t last, int) {
    HeadScratch s(q);
    std::vector<float> scratch(2 * g.out_plane());
    for (int64_t b = first; b < last; ++b) {
      load_head(q, qkv, pe, b, scale, &s);
      float *weights_b = weights + b * g.offsets() * g.out_plane();
      std::fill(weights_b, weights_b + g.offsets() * g.out_plane(), 0.0f);
      correlate(g, s.query.data(), s.key_pad.data(), weights_b);
      softmax_over_offsets(g, weights_b, scratch.data(), scratch.data() + g.out_plane());
      gather(g, weights_b, s.value_pad.data(), out + b * g.dim * g.out_plane());
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
  if (!is_float32(dtypes[1])) return 2;
  const Geometry &g = q.g;
  const float *grad_out = static_cast<const float *>(params[0]);
  const float *weights = static_cast<const float *>(params[1]);
  const float *qkv = static_cast<const float *>(params[2]);
  const float *pe = static_cast<const float *>(params[3]);
  float *grad_qkv = static_cast<float *>(params[5]);
  float *grad_pe = static_cast<float *>(params[6]);
  const float scale = query_scale(g);
  const int64_t n = g.out_plane(), plane = q.plane();
  const int workers = acmix::num_workers();
  std::vector<float> grad_pe_parts(static_cast<size_t>(workers) * g.dim * plane, 0.0f);
  acmix::parallel_for(g.heads, [&](int64_t first, int64_t last, int worker) {
    HeadScratch s(q);
    std::vector<float> grad_logits(g.offsets() * n), total(n), grad_query(g.dim * n);
    std::vector<float> grad_pad(g.dim * g.pad_plane());
    float *grad_pe_part = grad_pe_parts.data() + static_cast<size_t>(worker) * g.dim * plane;
    for (int64_t b = first; b < last; ++b) {
      const int64_t image = b / q.num_heads, head = b % q.num_heads;
      load_head(q, qkv, pe, b, scale, &s);
      const float *weights_b = weights + b * g.offsets() * n;
      const float *grad_out_b = grad_out + b * g.dim * n;
      std::fill(grad_logits.begin(), grad_logits.end(), 0.0f);
      correlate(g, grad_out_b, s.value_pad.data(), grad_logits.data());
      softmax_backward(g, weights_b, grad_logits.data(), total.data());
      // query: d scaled-strided query, scattered back to the strided pixels (others get 0)
      gather(g, grad_logits.data(), s.key_pad.data(), grad_query.data());
      for (int64_t j = 0; j < g.dim; ++j) {
        float *dst = grad_qkv + q.qkv_plane(image, head, j);
        std::fill(dst, dst + plane, 0.0f);
        const float *src = grad_query.data() + j * n;
        for (int64_t i = 0; i < g.out_h; ++i) {
          for (int64_t x = 0; x < g.out_w; ++x) dst[i * g.stride * q.width + x * g.stride] = src[i * g.out_w + x] * scale;
        }
      }
      // keys (and -pe): fold the padded gradient back
      scatter(g, grad_logits.data(), s.query.data(), grad_pad.data());
      for (int64_t j = 0; j < g.dim; ++j) {
        float *dst = grad_qkv + q.qkv_plane(image, q.num_heads + head, j);
        std::fill(dst, dst + plane, 0.0f);
        fold_plane(q, s, grad_pad.data() + j * g.pad_plane(), dst);
        float *pe_j = grad_pe_part + j * plane;
        for (int64_t x = 0; x < plane; ++x) pe_j[x] -= dst[x];
      }
      // values
      scatter(g, weights_b, grad_out_b, grad_pad.data());
      for (int64_t j = 0; j < g.dim; ++j) {
        float *dst = grad_qkv + q.qkv_plane(image, 2 * q.num_heads + head, j);
        std::fill(dst, dst + plane, 0.0f);
        fold_plane(q, s, grad_pad.data() + j * g.pad_plane(), dst);
      }
    }
  });
  std::fill(grad_pe, grad_pe + g.dim * plane, 0.0f);
  for (int w = 0; w < workers; ++w) {
    const float *part = grad_pe_parts.data() + static_cast<size_t>(w) * g.dim * plane;
    for (int64_t x = 0; x < g.dim * plane; ++x) grad_pe[x] += part[x];
  }
  return 0;
}

}  // extern "C"
