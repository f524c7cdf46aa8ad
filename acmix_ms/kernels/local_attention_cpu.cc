// Sliding-window attention aggregation for the CPU backend: MindSpore ops.Custom(func_type="aot") kernels.
//
// The same computation as acmix_ms.local_attention.UnfoldLocalAttention, without any (BN, d, k*k, H', W')
// temporary: every head (b) is handled by one thread, walking the k*k offsets over the padded keys/values
// in place. Memory: the outputs plus one (k*k, H', W') scratch per thread in the backward pass.
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
inline void add_products(float *dst, const float *x, const float *src, int64_t n, int64_t stride) {
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
#pragma omp parallel
  {
    std::vector<float> scratch(2 * g.out_plane());
#pragma omp for schedule(static)
    for (int64_t b = 0; b < g.heads; ++b) {
      float *weights_b = weights + b * g.offsets() * g.out_plane();
      std::fill(weights_b, weights_b + g.offsets() * g.out_plane(), 0.0f);
      correlate(g, query + b * g.dim * g.out_plane(), key_pad + b * g.dim * g.pad_plane(), weights_b);
      softmax_over_offsets(g, weights_b, scratch.data(), scratch.data() + g.out_plane());
      gather(g, weights_b, value_pad + b * g.dim * g.pad_plane(), out + b * g.dim * g.out_plane());
    }
  }
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
#pragma omp parallel
  {
    std::vector<float> grad_logits(g.offsets() * n);
    std::vector<float> total(n);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < g.heads; ++b) {
      const float *weights_b = weights + b * g.offsets() * n;
      const float *grad_out_b = grad_out + b * g.dim * n;
      const float *query_b = query + b * g.dim * n;
      // d loss / d weights[p] = grad_out . value neighbour p; then through the softmax:
      // d loss / d logits[p] = A_p * (dA_p - sum_q A_q dA_q)
      std::fill(grad_logits.begin(), grad_logits.end(), 0.0f);
      correlate(g, grad_out_b, value_pad + b * g.dim * g.pad_plane(), grad_logits.data());
      std::fill(total.begin(), total.end(), 0.0f);
      for (int64_t p = 0; p < g.offsets(); ++p) {
        const float *w_p = weights_b + p * n;
        const float *gl_p = grad_logits.data() + p * n;
        for (int64_t x = 0; x < n; ++x) total[x] += w_p[x] * gl_p[x];
      }
      for (int64_t p = 0; p < g.offsets(); ++p) {
        const float *w_p = weights_b + p * n;
        float *gl_p = grad_logits.data() + p * n;
        for (int64_t x = 0; x < n; ++x) gl_p[x] = w_p[x] * (gl_p[x] - total[x]);
      }
      gather(g, grad_logits.data(), key_pad + b * g.dim * g.pad_plane(), grad_query + b * g.dim * n);
      scatter(g, grad_logits.data(), query_b, grad_key_pad + b * g.dim * g.pad_plane());
      scatter(g, weights_b, grad_out_b, grad_value_pad + b * g.dim * g.pad_plane());
    }
  }
  return 0;
}

}  // extern "C"
