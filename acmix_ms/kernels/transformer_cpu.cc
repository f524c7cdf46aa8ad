// Element-wise and row-wise layers of the transformer blocks (Swin, PVT) for the CPU backend:
// MindSpore ops.Custom(func_type="aot") kernels, threaded with OpenMP.
//
// Why: MindSpore 2.8 runs the exact GELU as five kernels (Div, Erf, Add, Mul, Mul) whose implicitly
// broadcast scalar operands keep several full-size temporaries alive until the graph ends; one pass here.
//
// GeluForward   inputs x (any shape, float32)            output y = x/2 * (1 + erf(x/sqrt(2)))
// GeluBackward  inputs dy, x                              output dx = dy * (Phi(x) + x * phi(x))
//   Phi: standard normal CDF = (1 + erf(x/sqrt(2)))/2, phi: its density exp(-x^2/2)/sqrt(2 pi).
//
// LayerNorm over the last axis (rows of length C), as nn.LayerNorm((C,)), float32:
// LayerNormForward   inputs x (R.., C), gamma (C), beta (C), config (1,) float32 = eps
//                    outputs y (like x), mean (R), rstd (R)     [rstd = 1/sqrt(var + eps), biased var]
// LayerNormBackward  inputs dy, x, gamma, mean, rstd
//                    outputs dx (like x), dgamma (C), dbeta (C)
//   xhat = (x - mean) * rstd, g = dy * gamma:
//   dx = rstd * (g - mean_C(g) - xhat * mean_C(g * xhat)), dgamma = sum_R dy * xhat, dbeta = sum_R dy.
//
// Permute: the axes of x (rank <= 8, float32) in the order given by config (int32, one entry per axis), as
// numpy.transpose. Why: MindSpore 2.8's CPU Transpose never returns its memory to the graph's pool
// (acmix_ms/layout.py); a Custom op's output is reused like any other.
// PermuteForward  inputs x, config (rank,) int32 = dims     output y with y.shape[k] = x.shape[dims[k]]
//
// Bias gradient of a dense layer: the column sums of dy (R.., C), as BiasAddGrad. Why: MindSpore 2.8's CPU
// BiasAddGrad took ~10 % of a Swin-T training step (240 ms of 2.3 s at batch 8, 224 px), several times the
// time to read its input; here rows are summed in chunks (vectorised over C, threaded), the chunks in order.
// BiasGrad  inputs dy (R.., C)     output db (C)
// The forward, x + bias on every row: MindSpore 2.8's CPU BiasAdd took ~60 ms of a Swin-T batch-8 inference (50
// calls); this threaded, vectorised pass ~20 ms.
// BiasAddRows  inputs x (R.., C), bias (C)     output y (like x)
//
// Softmax over the last axis (rows of length L), as ops.softmax(x, -1). Why: MindSpore 2.8 runs its gradient on CPU
// as Mul, ReduceSum, Sub, Mul: ~110 ms of a Swin-T training step (batch 8, 224 px), ReduceSum alone 69 ms.
// SoftmaxForward   inputs x (R.., L)       output y = exp(x - max) / sum exp(x - max) per row
// SoftmaxBackward  inputs dy, y            output dx = y * (dy - sum_L dy * y)
//
// AOT signature (MindSpore 2.8+): int f(int nparam, void **params, int *ndims, int64_t **shapes,
//                                        const char **dtypes, void *stream, void *extra)
// params = inputs then outputs. Return 0 on success; anything else makes MindSpore raise.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>


// Threads: the kernels' shared pool (parallel.h, idle workers sleep) where this package has it, else OpenMP
// (when compiled with -fopenmp), else one thread. for_rows(n, fn) calls fn(begin, end, chunk) on contiguous
// chunks of [0, n); chunk < chunks(n) indexes per-chunk partial sums (added in chunk order: deterministic).
#if __has_include("parallel.h")
#include "parallel.h"
namespace {
inline int64_t chunks(int64_t n) { return acmix::num_chunks(n); }
template <typename Fn>
inline void for_rows(int64_t n, Fn fn) {
  acmix::parallel_for(n, fn);
}
}  // namespace
#else
#ifdef _OPENMP
#include <omp.h>
#endif
namespace {
inline int workers() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}
inline int64_t chunks(int64_t) { return workers(); }
template <typename Fn>
inline void for_rows(int64_t n, Fn fn) {
  const int count = workers();
#pragma omp parallel for schedule(static) num_threads(count)
  for (int t = 0; t < count; ++t) {
    const int64_t begin = n * t / count, end = n * (t + 1) / count;
    if (begin < end) fn(begin, end, t);
  }
}
}  // namespace
#endif

namespace {

bool is_float32(const char *dtype) { return std::strcmp(dtype, "float32") == 0 || std::strcmp(dtype, "float") == 0; }

int64_t element_count(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

constexpr float kInvSqrt2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;

// erf(x) for float32 as a rational function of x (the approximation of Eigen / XLA's float erf: odd
// polynomial of degree 13 over an even one of degree 8 on [-4, 4], where |erf| reaches 1 in float32).
// Branch-free, so the loops below vectorise; within a few float32 ulps of std::erf (checked by the tests).
inline float erf_approx(float x) {
  x = x < -4.0f ? -4.0f : (x > 4.0f ? 4.0f : x);
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 - 2.10102402082508e-06f;
  p = p * x2 - 5.69250639462346e-05f;
  p = p * x2 - 7.34990630326855e-04f;
  p = p * x2 - 2.95459980854025e-03f;
  p = p * x2 - 1.60960333262415e-02f;
  float q = -1.45660718464996e-05f;
  q = q * x2 - 2.13374055278905e-04f;
  q = q * x2 - 1.68282697438203e-03f;
  q = q * x2 - 7.37332916720468e-03f;
  q = q * x2 - 1.42647390514189e-02f;
  return x * p / q;
}

// sum of x[i] (centred: of (x[i] - mean)^2) in 8 interleaved lanes, so the loop vectorises (a serial float sum
// does not), then the tail
inline float lane_sum(const float *__restrict x, float mean, int64_t n, bool centred_squares) {
  float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  float total = 0.0f;
  int64_t i = 0;
  if (centred_squares) {
    for (; i + 8 <= n; i += 8) {
      for (int l = 0; l < 8; ++l) {
        const float d = x[i + l] - mean;
        lanes[l] += d * d;
      }
    }
    for (; i < n; ++i) total += (x[i] - mean) * (x[i] - mean);
  } else {
    for (; i + 8 <= n; i += 8) {
      for (int l = 0; l < 8; ++l) lanes[l] += x[i + l];
    }
    for (; i < n; ++i) total += x[i];
  }
  for (int l = 0; l < 8; ++l) total += lanes[l];
  return total;
}

// exp(x) for float32 x <= 0 (Cephes expf: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial, times 2^n
// built in the exponent bits); 0 below -87. Branch-free, vectorises; within 2 float32 ulps of std::exp.
inline float exp_nonpositive(float x) {
  const bool underflow = x < -87.0f;
  x = underflow ? -87.0f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  union {
    int32_t i;
    float f;
  } scale;
  scale.i = (static_cast<int32_t>(n) + 127) << 23;
  return underflow ? 0.0f : p * scale.f;
}

}  // namespace

extern "C" {

int GeluForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 2 || !is_float32(dtypes[0]) || !is_float32(dtypes[1])) return 1;
  const int64_t n = element_count(ndims[0], shapes[0]);
  if (element_count(ndims[1], shapes[1]) != n) return 2;
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  for_rows(n, [&](int64_t begin, int64_t end, int) {
    for (int64_t i = begin; i < end; ++i) {
      const float v = x[i];
      y[i] = 0.5f * v * (1.0f + erf_approx(v * kInvSqrt2));
    }
  });
  return 0;
}

int GeluBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                 void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 3 || !is_float32(dtypes[0]) || !is_float32(dtypes[1]) || !is_float32(dtypes[2])) return 1;
  const int64_t n = element_count(ndims[0], shapes[0]);
  if (element_count(ndims[1], shapes[1]) != n || element_count(ndims[2], shapes[2]) != n) return 2;
  const float *dy = static_cast<const float *>(params[0]);
  const float *x = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[2]);
  for_rows(n, [&](int64_t begin, int64_t end, int) {
    for (int64_t i = begin; i < end; ++i) {
      const float v = x[i];
      const float cdf = 0.5f * (1.0f + erf_approx(v * kInvSqrt2));
      const float pdf = kInvSqrt2Pi * exp_nonpositive(-0.5f * v * v);
      dx[i] = dy[i] * (cdf + v * pdf);
    }
  });
  return 0;
}

int LayerNormForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                     void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 7) return 1;
  for (int t = 0; t < 7; ++t) {
    if (!is_float32(dtypes[t])) return 1;
  }
  const int64_t cols = shapes[0][ndims[0] - 1];
  const int64_t rows = element_count(ndims[0], shapes[0]) / cols;
  if (element_count(ndims[1], shapes[1]) != cols || element_count(ndims[2], shapes[2]) != cols) return 2;
  if (element_count(ndims[5], shapes[5]) != rows || element_count(ndims[6], shapes[6]) != rows) return 2;
  const float *x = static_cast<const float *>(params[0]);
  const float *gamma = static_cast<const float *>(params[1]);
  const float *beta = static_cast<const float *>(params[2]);
  const float eps = static_cast<const float *>(params[3])[0];
  float *y = static_cast<float *>(params[4]);
  float *mean_out = static_cast<float *>(params[5]);
  float *rstd_out = static_cast<float *>(params[6]);
  const float inv_cols = 1.0f / static_cast<float>(cols);
  for_rows(rows, [&](int64_t begin, int64_t end, int) {
  for (int64_t r = begin; r < end; ++r) {
    const float *xr = x + r * cols;
    float *yr = y + r * cols;
    const float mean = lane_sum(xr, 0.0f, cols, false) * inv_cols;
    const float sq = lane_sum(xr, mean, cols, true);
    const float rstd = 1.0f / std::sqrt(sq * inv_cols + eps);
    for (int64_t c = 0; c < cols; ++c) yr[c] = (xr[c] - mean) * rstd * gamma[c] + beta[c];
    mean_out[r] = mean;
    rstd_out[r] = rstd;
  }
  });
  return 0;
}

int LayerNormBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                      void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 8) return 1;
  for (int t = 0; t < 8; ++t) {
    if (!is_float32(dtypes[t])) return 1;
  }
  const int64_t cols = shapes[1][ndims[1] - 1];
  const int64_t rows = element_count(ndims[1], shapes[1]) / cols;
  if (element_count(ndims[0], shapes[0]) != rows * cols || element_count(ndims[2], shapes[2]) != cols) return 2;
  if (element_count(ndims[3], shapes[3]) != rows || element_count(ndims[4], shapes[4]) != rows) return 2;
  const float *dy = static_cast<const float *>(params[0]);
  const float *x = static_cast<const float *>(params[1]);
  const float *gamma = static_cast<const float *>(params[2]);
  const float *mean = static_cast<const float *>(params[3]);
  const float *rstd = static_cast<const float *>(params[4]);
  float *dx = static_cast<float *>(params[5]);
  float *dgamma = static_cast<float *>(params[6]);
  float *dbeta = static_cast<float *>(params[7]);
  const float inv_cols = 1.0f / static_cast<float>(cols);
  const int64_t threads = chunks(rows);
  // per-chunk partial sums of dgamma / dbeta, added in chunk order (deterministic for a thread count)
  std::vector<float> partial(static_cast<size_t>(threads) * 2 * cols, 0.0f);
  for_rows(rows, [&](int64_t begin, int64_t end, int64_t chunk) {
    float *pg = partial.data() + static_cast<size_t>(chunk) * 2 * cols;
    float *pb = pg + cols;
    for (int64_t r = begin; r < end; ++r) {
      const float *xr = x + r * cols;
      const float *dyr = dy + r * cols;
      float *dxr = dx + r * cols;
      const float m = mean[r];
      const float s = rstd[r];
      float sum_g = 0.0f, sum_gx = 0.0f;
      for (int64_t c = 0; c < cols; ++c) {
        const float xhat = (xr[c] - m) * s;
        const float g = dyr[c] * gamma[c];
        sum_g += g;
        sum_gx += g * xhat;
        pg[c] += dyr[c] * xhat;
        pb[c] += dyr[c];
      }
      const float mean_g = sum_g * inv_cols, mean_gx = sum_gx * inv_cols;
      for (int64_t c = 0; c < cols; ++c) {
        const float xhat = (xr[c] - m) * s;
        dxr[c] = s * (dyr[c] * gamma[c] - mean_g - xhat * mean_gx);
      }
    }
  });
  for (int64_t c = 0; c < cols; ++c) {
    float g = 0.0f, b = 0.0f;
    for (int t = 0; t < threads; ++t) {
      g += partial[static_cast<size_t>(t) * 2 * cols + c];
      b += partial[static_cast<size_t>(t) * 2 * cols + cols + c];
    }
    dgamma[c] = g;
    dbeta[c] = b;
  }
  return 0;
}

// y[i_0, .., i_{r-1}] = x[sum_k i_k * xstride[dims[k]]]. The output is written row by row (its last axis);
// when that axis is strided in x and the one before it is x's last axis (a transpose of the two inner
// axes), 8 output rows are filled together so every x cache line read serves 8 writes.
int PermuteForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                   void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 3) return 1;
  const int rank = ndims[0];
  if (rank < 1 || rank > 8 || ndims[2] != rank || ndims[1] != 1 || shapes[1][0] != rank) return 2;
  if (!is_float32(dtypes[0]) || !is_float32(dtypes[2])) return 2;
  const int32_t *dims = static_cast<const int32_t *>(params[1]);
  int64_t xstride[8], stride[8], shape[8];
  xstride[rank - 1] = 1;
  for (int k = rank - 2; k >= 0; --k) xstride[k] = xstride[k + 1] * shapes[0][k + 1];
  bool seen[8] = {false, false, false, false, false, false, false, false};
  for (int k = 0; k < rank; ++k) {
    if (dims[k] < 0 || dims[k] >= rank || seen[dims[k]]) return 2;
    seen[dims[k]] = true;
    shape[k] = shapes[0][dims[k]];
    stride[k] = xstride[dims[k]];
    if (shapes[2][k] != shape[k]) return 2;
  }
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[2]);
  const int64_t cols = shape[rank - 1], col_stride = stride[rank - 1];
  const bool tiled = rank >= 2 && col_stride != 1 && stride[rank - 2] == 1;
  const int64_t tile = tiled ? 8 : 1, rows_inner = rank >= 2 ? shape[rank - 2] : 1;
  const int64_t row_tiles = (rows_inner + tile - 1) / tile;
  int64_t outer = 1;  // the output's axes before the last two
  for (int k = 0; k < rank - 2; ++k) outer *= shape[k];
  if (outer * rows_inner * cols == 0) return 0;
  for_rows(outer * row_tiles, [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t o = task / row_tiles, r0 = (task % row_tiles) * tile;
      int64_t base = 0, rest = o;  // x offset of output index (o's axes, r0, 0)
      for (int k = rank - 3; k >= 0; --k) {
        base += (rest % shape[k]) * stride[k];
        rest /= shape[k];
      }
      const int64_t row_stride = rank >= 2 ? stride[rank - 2] : 0;
      float *out = y + (o * rows_inner + r0) * cols;
      if (tiled && r0 + tile <= rows_inner) {
        const float *src = x + base + r0;  // the 8 rows are 8 consecutive floats of x
        for (int64_t c = 0; c < cols; ++c) {
          const float *p = src + c * col_stride;
          for (int64_t t = 0; t < 8; ++t) out[t * cols + c] = p[t];
        }
        continue;
      }
      const int64_t last = std::min(rows_inner, r0 + tile);
      for (int64_t r = r0; r < last; ++r, out += cols) {
        const float *src = x + base + r * row_stride;
        if (col_stride == 1) {
          std::memcpy(out, src, sizeof(float) * cols);
        } else {
          for (int64_t c = 0; c < cols; ++c) out[c] = src[c * col_stride];
        }
      }
    }
  });
  return 0;
}

int SoftmaxForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                   void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 2) return 1;
  if (!is_float32(dtypes[0]) || !is_float32(dtypes[1]) || ndims[0] < 1) return 2;
  const int64_t cols = shapes[0][ndims[0] - 1];
  const int64_t total = element_count(ndims[0], shapes[0]);
  if (element_count(ndims[1], shapes[1]) != total || cols < 1) return 2;
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  for_rows(total / cols, [&](int64_t begin, int64_t end, int) {
    for (int64_t r = begin; r < end; ++r) {
      const float *__restrict xr = x + r * cols;
      float *__restrict yr = y + r * cols;
      float top = xr[0];
      bool nan = false;
      for (int64_t c = 0; c < cols; ++c) {
        top = xr[c] > top ? xr[c] : top;
        nan = nan || xr[c] != xr[c];
      }
      if (nan || !(top > -INFINITY && top < INFINITY)) {  // NaN or +-inf: std::exp gives the reference's NaNs
        float sum = 0.0f;
        for (int64_t c = 0; c < cols; ++c) sum += (yr[c] = std::exp(xr[c] - top));
        for (int64_t c = 0; c < cols; ++c) yr[c] /= sum;
        continue;
      }
      for (int64_t c = 0; c < cols; ++c) yr[c] = exp_nonpositive(xr[c] - top);  // vectorised
      float sum = 0.0f;
      for (int64_t c = 0; c < cols; ++c) sum += yr[c];
      const float inv = 1.0f / sum;
      for (int64_t c = 0; c < cols; ++c) yr[c] *= inv;
    }
  });
  return 0;
}

int SoftmaxBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                    void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 3) return 1;
  for (int t = 0; t < 3; ++t) {
    if (!is_float32(dtypes[t])) return 2;
  }
  if (ndims[0] < 1) return 2;
  const int64_t cols = shapes[0][ndims[0] - 1];
  const int64_t total = element_count(ndims[0], shapes[0]);
  if (element_count(ndims[1], shapes[1]) != total || element_count(ndims[2], shapes[2]) != total || cols < 1) {
    return 2;
  }
  const float *dy = static_cast<const float *>(params[0]);
  const float *y = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[2]);
  for_rows(total / cols, [&](int64_t begin, int64_t end, int) {
    for (int64_t r = begin; r < end; ++r) {
      const float *__restrict dyr = dy + r * cols;
      const float *__restrict yr = y + r * cols;
      float *__restrict dxr = dx + r * cols;
      float dot = 0.0f;
      for (int64_t c = 0; c < cols; ++c) dot += dyr[c] * yr[c];
      for (int64_t c = 0; c < cols; ++c) dxr[c] = yr[c] * (dyr[c] - dot);
    }
  });
  return 0;
}

int BiasGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
             void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 2) return 1;
  if (!is_float32(dtypes[0]) || !is_float32(dtypes[1]) || ndims[0] < 1 || ndims[1] != 1) return 2;
  const int64_t cols = shapes[0][ndims[0] - 1];
  if (shapes[1][0] != cols) return 2;
  const int64_t rows = cols > 0 ? element_count(ndims[0], shapes[0]) / cols : 0;
  const float *dy = static_cast<const float *>(params[0]);
  float *db = static_cast<float *>(params[1]);
  const int64_t count = chunks(rows);
  std::vector<float> partial(std::max<int64_t>(count, 1) * cols, 0.0f);
  for_rows(rows, [&](int64_t begin, int64_t end, int64_t chunk) {
    float *__restrict sum = partial.data() + chunk * cols;
    for (int64_t r = begin; r < end; ++r) {
      const float *__restrict row = dy + r * cols;
      for (int64_t c = 0; c < cols; ++c) sum[c] += row[c];
    }
  });
  std::fill(db, db + cols, 0.0f);
  for (int64_t chunk = 0; chunk < count; ++chunk) {
    for (int64_t c = 0; c < cols; ++c) db[c] += partial[chunk * cols + c];
  }
  return 0;
}

int BiasAddRows(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 3) return 1;
  if (!is_float32(dtypes[0]) || !is_float32(dtypes[1]) || !is_float32(dtypes[2]) || ndims[0] < 1 || ndims[1] != 1 ||
      ndims[2] != ndims[0]) {
    return 2;
  }
  const int64_t cols = shapes[0][ndims[0] - 1];
  if (shapes[1][0] != cols) return 2;
  for (int axis = 0; axis < ndims[0]; ++axis) {
    if (shapes[2][axis] != shapes[0][axis]) return 2;
  }
  const int64_t rows = cols > 0 ? element_count(ndims[0], shapes[0]) / cols : 0;
  const float *x = static_cast<const float *>(params[0]);
  const float *bias = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  for_rows(rows, [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t r = begin; r < end; ++r) {
      const float *__restrict xr = x + r * cols;
      const float *__restrict b = bias;
      float *__restrict yr = y + r * cols;
      for (int64_t c = 0; c < cols; ++c) yr[c] = xr[c] + b[c];
    }
  });
  return 0;
}

}  // extern "C"
