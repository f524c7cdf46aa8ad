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
// AOT signature (MindSpore 2.8+): int f(int nparam, void **params, int *ndims, int64_t **shapes,
//                                        const char **dtypes, void *stream, void *extra)
// params = inputs then outputs. Return 0 on success; anything else makes MindSpore raise.
#include <cmath>
#include <cstdint>
#include <cstring>

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
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    y[i] = 0.5f * v * (1.0f + erf_approx(v * kInvSqrt2));
  }
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
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float cdf = 0.5f * (1.0f + erf_approx(v * kInvSqrt2));
    const float pdf = kInvSqrt2Pi * exp_nonpositive(-0.5f * v * v);
    dx[i] = dy[i] * (cdf + v * pdf);
  }
  return 0;
}

}  // extern "C"
