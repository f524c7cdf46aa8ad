// Layers of the convolutional networks (ResNet's stem pooling) and the training step's finiteness check for the
// CPU backend: MindSpore ops.Custom(func_type="aot") kernels, threaded by the package's pool (parallel.h).
//
// Max pooling over NCHW planes with implicit -inf padding (nn.MaxPool2d(k, s, pad_mode="pad", padding=p),
// floor output size). Why: MindSpore 2.8 runs it on CPU as MaxPool3DWithArgmax, ~50 ms for ResNet-26's stem at
// batch 8, 224 px (12 % of an inference step); here a vertical max over the window's rows (contiguous,
// vectorised) then the horizontal max over the columns. NaN propagates (a window holding NaN gives NaN).
// MaxPool2dForward       inputs x (B, C, H, W) float32, config (6,) int32 = (kh, kw, sh, sw, ph, pw)
//                        output y (B, C, Ho, Wo), Ho = (H + 2 ph - kh) / sh + 1 (floor), same for Wo
// MaxPool2dForwardIndex  the same inputs; outputs y and index (B, C, Ho, Wo) int32: where each maximum is (h W + w)
// MaxPool2dBackward      inputs dy (B, C, Ho, Wo), index, x (B, C, H, W) (its shape)     output dx (like x)
//   dx[index] += dy. Of tied maxima the index names the leftmost column's topmost (MindSpore and PyTorch may name
//   another; after a ReLU, tied zeros get no gradient either way). A NaN in the window is its maximum.
//
// Finiteness of many tensors at once (the training step's check of every gradient). Why: MindSpore 2.8's CPU
// amp.all_finite is IsFinite + ReduceAll + a cast per tensor; its ReduceAll alone took ~45 ms of a ResNet-26
// training step (batch 8, 224 px). Here one pass over the bits of every tensor, threaded over segments.
// AllFinite  inputs t_1 .. t_n (float32, any shapes)    output ok (1,) float32: 1 if every element is finite, else 0
//
// Batch normalisation of NCHW tensors over (B, H, W) per channel, as nn.BatchNorm2d. Why: MindSpore 2.8's CPU
// BatchNorm + BatchNormGrad took 34 % of a resnet_tiny training step and 12 % of a ResNet-26 inference step.
// BatchNormTrain     inputs x (B, C, H, W) float32, gamma (C), beta (C), moving mean (C), moving var (C),
//                    config (3,) float32 = (eps, momentum, relu)
//                    outputs y (like x), mean (C), rstd (C) = 1/sqrt(var + eps), the updated moving mean and var (C):
//                    (1 - momentum) old + momentum batch, the batch variance unbiased (var M / (M - 1), M = B H W;
//                    var where M = 1), as nn.BatchNorm2d (whose momentum argument is 1 - this momentum).
//                    relu != 0: y = max(normalised, 0) (BatchNorm then ReLU in one pass)
// BatchNormBackward  inputs dy, x, gamma, mean, rstd, y, config (1,) float32 = (relu)
//                    outputs dx (like x), dgamma (C), dbeta (C); with relu dy counts only where y > 0
//   xhat = (x - mean) rstd: dbeta = sum dy, dgamma = sum dy xhat, dx = gamma rstd (dy - dbeta/M - xhat dgamma/M)
// BatchNormInfer     inputs x, gamma, beta, moving mean (C), moving var (C), config (2,) = (eps, relu)   output y
//   y = (x - mean) gamma / sqrt(var + eps) + beta (then max(y, 0) with relu), one pass
// BatchNormAddTrain / BatchNormAddBackward / BatchNormAddInfer: the same with a residual r (like x) as the second
//   input: y = BN(x) + r, then max(., 0) with relu (a ResNet block's bn3, shortcut addition and ReLU in one pass:
//   MindSpore's Add + ReLU were ~23 ms of a 410 ms ResNet-26 inference). The backward's outputs are dx, dr, dgamma,
//   dbeta with dr = dy (masked by y > 0 with relu).
// Sums run in float over each plane (vectorised) and in double across planes.
//
// AOT signature (MindSpore 2.8+): int f(int nparam, void **params, int *ndims, int64_t **shapes,
//                                        const char **dtypes, void *stream, void *extra)
// params = inputs then outputs. Return 0 on success; anything else makes MindSpore raise.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "parallel.h"

namespace {

bool is_float32(const char *dtype) { return std::strcmp(dtype, "float32") == 0 || std::strcmp(dtype, "float") == 0; }
bool is_int32(const char *dtype) { return std::strcmp(dtype, "int32") == 0; }

// max that keeps NaN: once m is NaN it stays NaN (v > NaN is false), and a NaN v replaces m. Branch-free.
inline float nan_max(float m, float v) { return (v > m || v != v) ? v : m; }

struct PoolGeometry {
  int64_t planes, height, width, out_height, out_width, kh, kw, sh, sw, ph, pw;
};

bool read_pool(int64_t **shapes, int *ndims, const char **dtypes, int x_index, int y_index, int config_index,
               void **params, PoolGeometry *g) {
  if (ndims[x_index] != 4 || ndims[y_index] != 4 || !is_float32(dtypes[x_index]) ||
      !is_float32(dtypes[y_index]) || !is_int32(dtypes[config_index]) || ndims[config_index] != 1 ||
      shapes[config_index][0] != 6) {
    return false;
  }
  const int32_t *config = static_cast<const int32_t *>(params[config_index]);
  const int64_t *x = shapes[x_index], *y = shapes[y_index];
  g->kh = config[0];
  g->kw = config[1];
  g->sh = config[2];
  g->sw = config[3];
  g->ph = config[4];
  g->pw = config[5];
  if (g->kh < 1 || g->kw < 1 || g->sh < 1 || g->sw < 1 || g->ph < 0 || g->pw < 0 || 2 * g->ph > g->kh ||
      2 * g->pw > g->kw) {
    return false;  // padding above half the window would give windows of padding only (as nn.MaxPool2d forbids)
  }
  g->planes = x[0] * x[1];
  g->height = x[2];
  g->width = x[3];
  g->out_height = (g->height + 2 * g->ph - g->kh) / g->sh + 1;
  g->out_width = (g->width + 2 * g->pw - g->kw) / g->sw + 1;
  return y[0] == x[0] && y[1] == x[1] && y[2] == g->out_height && y[3] == g->out_width && g->out_height > 0 &&
         g->out_width > 0;
}

// Rows of the input inside output row oh's window: [first, last).
inline void window_rows(const PoolGeometry &g, int64_t oh, int64_t *first, int64_t *last) {
  const int64_t top = oh * g.sh - g.ph;
  *first = std::max<int64_t>(top, 0);
  *last = std::min<int64_t>(top + g.kh, g.height);
}

// The pooling of planes [begin, end): y, and where index is not null the position (h * W + w) of each maximum.
void max_pool(const PoolGeometry &g, const float *x, float *y, int32_t *index, int64_t begin, int64_t end) {
  const int64_t padded_width = g.width + 2 * g.pw;
  // columns: the column maxima of one output row's window rows (rows: their row), -inf in the padding columns
  std::vector<float> vmax(padded_width, -std::numeric_limits<float>::infinity());
  std::vector<int32_t> vrow(padded_width, 0);
  float *__restrict columns = vmax.data() + g.pw;
  int32_t *__restrict rows = vrow.data() + g.pw;
  for (int64_t p = begin; p < end; ++p) {
    const float *plane = x + p * g.height * g.width;
    const int64_t out_offset = p * g.out_height * g.out_width;
    for (int64_t oh = 0; oh < g.out_height; ++oh) {
      int64_t first, last;
      window_rows(g, oh, &first, &last);
      const float *__restrict row = plane + first * g.width;
      for (int64_t w = 0; w < g.width; ++w) columns[w] = row[w];
      if (index) {
        for (int64_t w = 0; w < g.width; ++w) rows[w] = static_cast<int32_t>(first);
      }
      for (int64_t h = first + 1; h < last; ++h) {
        row = plane + h * g.width;
        if (index) {
          const int32_t hh = static_cast<int32_t>(h);
          for (int64_t w = 0; w < g.width; ++w) {
            const bool take = row[w] > columns[w] || row[w] != row[w];
            columns[w] = take ? row[w] : columns[w];
            rows[w] = take ? hh : rows[w];
          }
        } else {
          for (int64_t w = 0; w < g.width; ++w) columns[w] = nan_max(columns[w], row[w]);
        }
      }
      float *out_row = y + out_offset + oh * g.out_width;
      if (!index) {
        for (int64_t ow = 0; ow < g.out_width; ++ow) {
          const float *window = vmax.data() + ow * g.sw;
          float m = window[0];
          for (int64_t j = 1; j < g.kw; ++j) m = nan_max(m, window[j]);
          out_row[ow] = m;
        }
        continue;
      }
      int32_t *index_row = index + out_offset + oh * g.out_width;
      for (int64_t ow = 0; ow < g.out_width; ++ow) {
        // the window's first real column (the padding holds -inf, never taken over a real value)
        const int64_t left = ow * g.sw - g.pw, start = std::max<int64_t>(left, 0);
        const int64_t stop = std::min<int64_t>(left + g.kw, g.width);
        float m = columns[start];
        int64_t col = start;
        for (int64_t w = start + 1; w < stop; ++w) {
          const bool take = columns[w] > m || columns[w] != columns[w];
          m = take ? columns[w] : m;
          col = take ? w : col;
        }
        out_row[ow] = m;
        index_row[ow] = static_cast<int32_t>(rows[col] * g.width + col);
      }
    }
  }
}


struct NormGeometry {
  int64_t batch, channels, plane;  // plane = H * W
};

bool read_norm(int64_t **shapes, int *ndims, const char **dtypes, int x_index, const int *channel_inputs,
               int channel_count, NormGeometry *g) {
  if (ndims[x_index] != 4 || !is_float32(dtypes[x_index])) return false;
  const int64_t *x = shapes[x_index];
  g->batch = x[0];
  g->channels = x[1];
  g->plane = x[2] * x[3];
  for (int i = 0; i < channel_count; ++i) {
    const int k = channel_inputs[i];
    if (ndims[k] != 1 || shapes[k][0] != g->channels || !is_float32(dtypes[k])) return false;
  }
  return g->batch > 0 && g->plane > 0;
}

bool same_shape(int64_t **shapes, int *ndims, int a, int b) {
  if (ndims[a] != ndims[b]) return false;
  for (int axis = 0; axis < ndims[a]; ++axis) {
    if (shapes[a][axis] != shapes[b][axis]) return false;
  }
  return true;
}

inline float plane_sum(const float *__restrict x, int64_t n) {
  float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) lanes[l] += x[i + l];
  }
  float total = 0.0f;
  for (; i < n; ++i) total += x[i];
  for (int l = 0; l < 8; ++l) total += lanes[l];
  return total;
}

inline float plane_centered_squares(const float *__restrict x, float mean, int64_t n) {
  float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) {
      const float d = x[i + l] - mean;
      lanes[l] += d * d;
    }
  }
  float total = 0.0f;
  for (; i < n; ++i) total += (x[i] - mean) * (x[i] - mean);
  for (int l = 0; l < 8; ++l) total += lanes[l];
  return total;
}

// (sum dy, sum dy (x - mean)) over one plane
inline void plane_grad_sums(const float *__restrict dy, const float *__restrict x, float mean, int64_t n,
                            float *sum_dy, float *sum_dy_xc) {
  float a[8] = {0, 0, 0, 0, 0, 0, 0, 0}, b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) {
      a[l] += dy[i + l];
      b[l] += dy[i + l] * (x[i + l] - mean);
    }
  }
  float ta = 0.0f, tb = 0.0f;
  for (; i < n; ++i) {
    ta += dy[i];
    tb += dy[i] * (x[i] - mean);
  }
  for (int l = 0; l < 8; ++l) {
    ta += a[l];
    tb += b[l];
  }
  *sum_dy = ta;
  *sum_dy_xc = tb;
}

// (sum g, sum g (x - mean)) over one plane, g = dy where y > 0, else 0 (the gradient through a ReLU)
inline void plane_grad_sums_relu(const float *__restrict dy, const float *__restrict y, const float *__restrict x,
                                 float mean, int64_t n, float *sum_dy, float *sum_dy_xc) {
  float a[8] = {0, 0, 0, 0, 0, 0, 0, 0}, b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) {
      const float g = y[i + l] > 0.0f ? dy[i + l] : 0.0f;
      a[l] += g;
      b[l] += g * (x[i + l] - mean);
    }
  }
  float ta = 0.0f, tb = 0.0f;
  for (; i < n; ++i) {
    const float g = y[i] > 0.0f ? dy[i] : 0.0f;
    ta += g;
    tb += g * (x[i] - mean);
  }
  for (int l = 0; l < 8; ++l) {
    ta += a[l];
    tb += b[l];
  }
  *sum_dy = ta;
  *sum_dy_xc = tb;
}

inline void affine(const float *__restrict x, float scale, float shift, int64_t n, float *__restrict y) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * scale + shift;
}

inline void affine_relu(const float *__restrict x, float scale, float shift, int64_t n, float *__restrict y) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i] * scale + shift;
    y[i] = v > 0.0f ? v : 0.0f;
  }
}

inline void affine_add(const float *__restrict x, const float *__restrict r, float scale, float shift, int64_t n,
                       float *__restrict y) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * scale + shift + r[i];
}

inline void affine_add_relu(const float *__restrict x, const float *__restrict r, float scale, float shift,
                            int64_t n, float *__restrict y) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i] * scale + shift + r[i];
    y[i] = v > 0.0f ? v : 0.0f;
  }
}

// y = x scale + shift (+ residual where given), then max(., 0) with relu
inline void normalise(bool relu, const float *x, const float *residual, float scale, float shift, int64_t n,
                      float *y) {
  if (residual != nullptr) {
    if (relu) {
      affine_add_relu(x, residual, scale, shift, n, y);
    } else {
      affine_add(x, residual, scale, shift, n, y);
    }
  } else if (relu) {
    affine_relu(x, scale, shift, n, y);
  } else {
    affine(x, scale, shift, n, y);
  }
}

// The batch-norm passes with and without a residual input r (the *Add* entry points: y = BN(x) + r, then the
// ReLU if set). o = 1 shifts every later parameter index past r.
int batch_norm_train(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool add) {
  const int o = add ? 1 : 0;
  if (nparam != 11 + o) return 1;
  NormGeometry g;
  const int channel_inputs[] = {1 + o, 2 + o, 3 + o, 4 + o, 7 + o, 8 + o, 9 + o, 10 + o};
  if (!read_norm(shapes, ndims, dtypes, 0, channel_inputs, 8, &g) || !same_shape(shapes, ndims, 0, 6 + o) ||
      !is_float32(dtypes[5 + o]) || !is_float32(dtypes[6 + o]) || ndims[5 + o] != 1 || shapes[5 + o][0] != 3 ||
      (add && (!same_shape(shapes, ndims, 0, 1) || !is_float32(dtypes[1])))) {
    return 2;
  }
  const float *x = static_cast<const float *>(params[0]);
  const float *residual = add ? static_cast<const float *>(params[1]) : nullptr;
  const float *gamma = static_cast<const float *>(params[1 + o]);
  const float *beta = static_cast<const float *>(params[2 + o]);
  const float *moving_mean = static_cast<const float *>(params[3 + o]);
  const float *moving_var = static_cast<const float *>(params[4 + o]);
  const float *config = static_cast<const float *>(params[5 + o]);
  const double eps = config[0];
  const float momentum = config[1];
  const bool relu = config[2] != 0.0f;
  float *y = static_cast<float *>(params[6 + o]);
  float *mean_out = static_cast<float *>(params[7 + o]);
  float *rstd_out = static_cast<float *>(params[8 + o]);
  float *new_mean = static_cast<float *>(params[9 + o]);
  float *new_var = static_cast<float *>(params[10 + o]);
  const int64_t count = g.batch * g.plane, stride = g.channels * g.plane;
  acmix::parallel_for(g.channels, [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t c = begin; c < end; ++c) {
      const float *first = x + c * g.plane;
      double total = 0.0;
      for (int64_t b = 0; b < g.batch; ++b) total += plane_sum(first + b * stride, g.plane);
      const double mean = total / count;
      double squares = 0.0;
      for (int64_t b = 0; b < g.batch; ++b) {
        squares += plane_centered_squares(first + b * stride, static_cast<float>(mean), g.plane);
      }
      const double var = squares / count;
      const double rstd = 1.0 / std::sqrt(var + eps);
      mean_out[c] = static_cast<float>(mean);
      rstd_out[c] = static_cast<float>(rstd);
      const float unbiased = static_cast<float>(count > 1 ? squares / (count - 1) : var);
      new_mean[c] = moving_mean[c] * (1.0f - momentum) + static_cast<float>(mean) * momentum;
      new_var[c] = moving_var[c] * (1.0f - momentum) + unbiased * momentum;
      const float scale = static_cast<float>(gamma[c] * rstd);
      const float shift = static_cast<float>(beta[c] - mean * gamma[c] * rstd);
      for (int64_t b = 0; b < g.batch; ++b) {
        const int64_t offset = c * g.plane + b * stride;
        normalise(relu, x + offset, add ? residual + offset : nullptr, scale, shift, g.plane, y + offset);
      }
    }
  });
  return 0;
}

// outputs dx, (dr with add), dgamma, dbeta; dr = the gradient reaching the sum (dy, masked by y > 0 with relu)
int batch_norm_backward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool add) {
  const int o = add ? 1 : 0;
  if (nparam != 10 + o) return 1;
  NormGeometry g;
  const int channel_inputs[] = {2, 3, 4, 8 + o, 9 + o};
  if (!read_norm(shapes, ndims, dtypes, 1, channel_inputs, 5, &g) || !same_shape(shapes, ndims, 0, 1) ||
      !same_shape(shapes, ndims, 0, 5) || !same_shape(shapes, ndims, 0, 7) || !is_float32(dtypes[0]) ||
      !is_float32(dtypes[5]) || !is_float32(dtypes[6]) || !is_float32(dtypes[7]) || ndims[6] != 1 ||
      shapes[6][0] != 1 || (add && (!same_shape(shapes, ndims, 0, 8) || !is_float32(dtypes[8])))) {
    return 2;
  }
  const float *dy = static_cast<const float *>(params[0]);
  const float *x = static_cast<const float *>(params[1]);
  const float *gamma = static_cast<const float *>(params[2]);
  const float *mean = static_cast<const float *>(params[3]);
  const float *rstd = static_cast<const float *>(params[4]);
  const float *y = static_cast<const float *>(params[5]);
  const bool relu = static_cast<const float *>(params[6])[0] != 0.0f;
  float *dx = static_cast<float *>(params[7]);
  float *dresidual = add ? static_cast<float *>(params[8]) : nullptr;
  float *dgamma = static_cast<float *>(params[8 + o]);
  float *dbeta = static_cast<float *>(params[9 + o]);
  const int64_t count = g.batch * g.plane, stride = g.channels * g.plane;
  acmix::parallel_for(g.channels, [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t c = begin; c < end; ++c) {
      double sum_dy = 0.0, sum_dy_xc = 0.0;
      for (int64_t b = 0; b < g.batch; ++b) {
        float a, d;
        const int64_t offset = c * g.plane + b * stride;
        if (add && relu) {  // dr = dy masked by the ReLU, written here and read back by the second pass
          float *__restrict drp = dresidual + offset;
          const float *__restrict dyp = dy + offset;
          const float *__restrict yp = y + offset;
          for (int64_t i = 0; i < g.plane; ++i) drp[i] = yp[i] > 0.0f ? dyp[i] : 0.0f;
          plane_grad_sums(drp, x + offset, mean[c], g.plane, &a, &d);
        } else if (relu) {
          plane_grad_sums_relu(dy + offset, y + offset, x + offset, mean[c], g.plane, &a, &d);
        } else {
          plane_grad_sums(dy + offset, x + offset, mean[c], g.plane, &a, &d);
        }
        sum_dy += a;
        sum_dy_xc += d;
      }
      const double r = rstd[c];
      dbeta[c] = static_cast<float>(sum_dy);
      dgamma[c] = static_cast<float>(sum_dy_xc * r);
      // dx = k g - slope (x - mean) - k sum_g / M, k = gamma r, slope = k r^2 sum_g_xc / M (g: dy through the ReLU)
      const float k = static_cast<float>(gamma[c] * r);
      const float slope = static_cast<float>(gamma[c] * r * r * r * sum_dy_xc / count);
      const float shift = static_cast<float>(-gamma[c] * r * sum_dy / count);
      const float centre = mean[c];
      for (int64_t b = 0; b < g.batch; ++b) {
        const int64_t offset = c * g.plane + b * stride;
        const float *__restrict dyp = dy + offset;
        const float *__restrict xp = x + offset;
        const float *__restrict yp = y + offset;
        float *__restrict dxp = dx + offset;
        if (add && relu) {
          const float *__restrict drp = dresidual + offset;
          for (int64_t i = 0; i < g.plane; ++i) dxp[i] = k * drp[i] - slope * (xp[i] - centre) + shift;
        } else if (relu) {
          for (int64_t i = 0; i < g.plane; ++i) {
            const float grad = yp[i] > 0.0f ? dyp[i] : 0.0f;
            dxp[i] = k * grad - slope * (xp[i] - centre) + shift;
          }
        } else {
          for (int64_t i = 0; i < g.plane; ++i) dxp[i] = k * dyp[i] - slope * (xp[i] - centre) + shift;
          if (add) std::memcpy(dresidual + offset, dyp, sizeof(float) * g.plane);
        }
      }
    }
  });
  return 0;
}

int batch_norm_infer(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool add) {
  const int o = add ? 1 : 0;
  if (nparam != 7 + o) return 1;
  NormGeometry g;
  const int channel_inputs[] = {1 + o, 2 + o, 3 + o, 4 + o};
  if (!read_norm(shapes, ndims, dtypes, 0, channel_inputs, 4, &g) || !same_shape(shapes, ndims, 0, 6 + o) ||
      !is_float32(dtypes[5 + o]) || ndims[5 + o] != 1 || shapes[5 + o][0] != 2 || !is_float32(dtypes[6 + o]) ||
      (add && (!same_shape(shapes, ndims, 0, 1) || !is_float32(dtypes[1])))) {
    return 2;
  }
  const float *x = static_cast<const float *>(params[0]);
  const float *residual = add ? static_cast<const float *>(params[1]) : nullptr;
  const float *gamma = static_cast<const float *>(params[1 + o]);
  const float *beta = static_cast<const float *>(params[2 + o]);
  const float *mean = static_cast<const float *>(params[3 + o]);
  const float *var = static_cast<const float *>(params[4 + o]);
  const double eps = static_cast<const float *>(params[5 + o])[0];
  const bool relu = static_cast<const float *>(params[5 + o])[1] != 0.0f;
  float *y = static_cast<float *>(params[6 + o]);
  acmix::parallel_for(g.batch * g.channels, [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t c = p % g.channels;
      const double scale = gamma[c] / std::sqrt(static_cast<double>(var[c]) + eps);
      normalise(relu, x + p * g.plane, add ? residual + p * g.plane : nullptr, static_cast<float>(scale),
                static_cast<float>(beta[c] - mean[c] * scale), g.plane, y + p * g.plane);
    }
  });
  return 0;
}

}  // namespace

extern "C" {

int MaxPool2dForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                     void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 3) return 1;
  PoolGeometry g;
  if (!read_pool(shapes, ndims, dtypes, 0, 2, 1, params, &g)) return 2;
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[2]);
  acmix::parallel_for(g.planes, [&](int64_t begin, int64_t end, int64_t) { max_pool(g, x, y, nullptr, begin, end); });
  return 0;
}

int MaxPool2dForwardIndex(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 4) return 1;
  PoolGeometry g;
  if (!read_pool(shapes, ndims, dtypes, 0, 2, 1, params, &g)) return 2;
  if (!is_int32(dtypes[3]) || ndims[3] != 4 || g.height * g.width > std::numeric_limits<int32_t>::max()) return 2;
  for (int axis = 0; axis < 4; ++axis) {
    if (shapes[3][axis] != shapes[2][axis]) return 2;
  }
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[2]);
  int32_t *index = static_cast<int32_t *>(params[3]);
  acmix::parallel_for(g.planes, [&](int64_t begin, int64_t end, int64_t) { max_pool(g, x, y, index, begin, end); });
  return 0;
}

int MaxPool2dBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                      void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 4) return 1;
  if (ndims[0] != 4 || ndims[1] != 4 || ndims[2] != 4 || ndims[3] != 4 || !is_float32(dtypes[0]) ||
      !is_int32(dtypes[1]) || !is_float32(dtypes[3])) {
    return 2;
  }
  for (int axis = 0; axis < 4; ++axis) {
    if (shapes[1][axis] != shapes[0][axis] || shapes[3][axis] != shapes[2][axis]) return 2;
  }
  if (shapes[0][0] != shapes[2][0] || shapes[0][1] != shapes[2][1]) return 2;
  const float *dy = static_cast<const float *>(params[0]);
  const int32_t *index = static_cast<const int32_t *>(params[1]);
  float *dx = static_cast<float *>(params[3]);
  const int64_t planes = shapes[2][0] * shapes[2][1];
  const int64_t in_size = shapes[2][2] * shapes[2][3], out_size = shapes[0][2] * shapes[0][3];
  bool in_range = true;
  std::vector<char> chunk_ok(std::max<int64_t>(acmix::num_chunks(planes), 1), 1);
  acmix::parallel_for(planes, [&](int64_t begin, int64_t end, int64_t chunk) {
    for (int64_t p = begin; p < end; ++p) {
      float *dplane = dx + p * in_size;
      std::fill(dplane, dplane + in_size, 0.0f);
      const int32_t *positions = index + p * out_size;
      const float *grads = dy + p * out_size;
      for (int64_t o = 0; o < out_size; ++o) {
        const int64_t at = positions[o];
        if (at < 0 || at >= in_size) {
          chunk_ok[chunk] = 0;
          continue;
        }
        dplane[at] += grads[o];
      }
    }
  });
  for (char ok : chunk_ok) in_range = in_range && ok;
  return in_range ? 0 : 3;
}


#define ACMIX_NORM_ENTRY(name, impl, add)                                                                     \
  int name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,         \
           void *extra) {                                                                                      \
    (void)stream;                                                                                              \
    (void)extra;                                                                                               \
    return impl(nparam, params, ndims, shapes, dtypes, add);                                                  \
  }
ACMIX_NORM_ENTRY(BatchNormTrain, batch_norm_train, false)
ACMIX_NORM_ENTRY(BatchNormAddTrain, batch_norm_train, true)
ACMIX_NORM_ENTRY(BatchNormBackward, batch_norm_backward, false)
ACMIX_NORM_ENTRY(BatchNormAddBackward, batch_norm_backward, true)
ACMIX_NORM_ENTRY(BatchNormInfer, batch_norm_infer, false)
ACMIX_NORM_ENTRY(BatchNormAddInfer, batch_norm_infer, true)
#undef ACMIX_NORM_ENTRY

int AllFinite(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
              void *extra) {
  (void)stream;
  (void)extra;
  if (nparam < 2) return 1;
  const int inputs = nparam - 1;
  if (!is_float32(dtypes[inputs]) || ndims[inputs] != 1 || shapes[inputs][0] != 1) return 2;
  // segments of at most kSegment elements over all tensors, checked in parallel
  constexpr int64_t kSegment = 1 << 15;
  struct Segment {
    const uint32_t *data;
    int64_t count;
  };
  std::vector<Segment> segments;
  for (int i = 0; i < inputs; ++i) {
    if (!is_float32(dtypes[i])) return 2;
    int64_t count = 1;
    for (int axis = 0; axis < ndims[i]; ++axis) count *= shapes[i][axis];
    const uint32_t *bits = static_cast<const uint32_t *>(params[i]);
    for (int64_t start = 0; start < count; start += kSegment) {
      segments.push_back({bits + start, std::min(kSegment, count - start)});
    }
  }
  std::vector<uint32_t> bad(std::max<int64_t>(acmix::num_chunks(static_cast<int64_t>(segments.size())), 1), 0);
  acmix::parallel_for(static_cast<int64_t>(segments.size()), [&](int64_t begin, int64_t end, int64_t chunk) {
    uint32_t flag = 0;
    for (int64_t s = begin; s < end; ++s) {
      const uint32_t *__restrict bits = segments[s].data;
      const int64_t count = segments[s].count;
      // all exponent bits set: inf or NaN. An OR-reduction over integers: vectorised without -ffast-math.
      for (int64_t k = 0; k < count; ++k) flag |= static_cast<uint32_t>((bits[k] & 0x7f800000u) == 0x7f800000u);
    }
    bad[chunk] = flag;
  });
  uint32_t any_bad = 0;
  for (uint32_t flag : bad) any_bad |= flag;
  *static_cast<float *>(params[inputs]) = any_bad ? 0.0f : 1.0f;
  return 0;
}

}  // extern "C"
