// CUDA kernels for fastcollab::native_pgd_step_ and fastcollab::native_project_l1_ (the schemas are in
// csrc/fastcollab_cpu.cpp). Compiled only when torch has CUDA and nvcc is found (setup.py), with
// --fmad=false so the l_inf step repeats the reference's rounding exactly.
// tests/test_cuda_compile.py compiles it (nvcc -c, sm_90) against the installed torch's headers on every CI
// run; it has not yet run on a GPU (tests/test_ops_backends.py::test_cuda_* and bench/gpu_check.sh do that).
// Only c10/cuda headers are included for the stream: ATen/cuda/CUDAContext.h pulls cuBLAS/cuSPARSE headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>

namespace fastcollab {
namespace {

constexpr int kThreads = 256;
constexpr int kL1KMax = 20;
constexpr int kBisect = 40;

template <typename T>
__device__ __forceinline__ T sign_step(T g, T st) {
  return g > T(0) ? st : (g < T(0) ? -st : T(0));
}
template <typename T>
__device__ __forceinline__ bool l1_stuck(T a, T g, T st) {
  // l1 steepest-ascent mask of Maini et al. (robust_union, l1_dir_topk, gap = step): within one step of an
  // edge and moving towards it, or on / past an edge whatever the gradient
  return (a <= st && g < T(0)) || (a >= T(1) - st && g > T(0)) || a <= T(0) || a >= T(1);
}

template <typename T>
__device__ __forceinline__ T clamp01(T t) {
  t = t < T(0) ? T(0) : t;
  return t > T(1) ? T(1) : t;
}

// block-wide sum (all threads get the result)
template <typename A>
__device__ A block_sum(A v, A* sh) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) sh[w] = v;
  __syncthreads();
  if (w == 0) {
    v = lane < (blockDim.x >> 5) ? sh[lane] : A(0);
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
    if (lane == 0) sh[0] = v;
  }
  __syncthreads();
  return sh[0];
}

template <typename T>
__device__ T block_max(T v, T* sh) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_down_sync(0xffffffff, v, o));
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) sh[w] = v;
  __syncthreads();
  if (w == 0) {
    v = lane < (blockDim.x >> 5) ? sh[lane] : T(0);
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_down_sync(0xffffffff, v, o));
    if (lane == 0) sh[0] = v;
  }
  __syncthreads();
  return sh[0];
}

template <typename T>
__global__ void linf_kernel(T* xa, const T* g, const T* x, int64_t N, int64_t per_peer, int64_t xN,
                            const T* eps, const T* step, int n_eps, int n_step) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= N) return;
  const int64_t p = i / per_peer;
  const T e = eps[n_eps == 1 ? 0 : p];
  const T st = step[n_step == 1 ? 0 : p];
  T t = xa[i] + sign_step(g[i], st);
  const T xi = x[i % xN];
  const T lo = xi - e, hi = xi + e;
  t = t < lo ? lo : t;
  t = t > hi ? hi : t;
  xa[i] = clamp01(t);
}

// Projection of row d (length D, in xa-space work buffer) on the l1 ball: bisection on theta then an exact
// refinement on the active set. Only rows with ||d||_1 > eps change.
template <typename T>
__device__ void project_row_dev(T* d, int64_t D, T eps, double* shd, T* sht) {
  double l1 = 0.0;
  T mx = T(0);
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    const T a = fabs(d[j]);
    l1 += (double)a;
    mx = max(mx, a);
  }
  l1 = block_sum<double>(l1, shd);
  mx = block_max<T>(mx, sht);
  if (!(l1 > (double)eps)) return;
  double lo = 0.0, hi = (double)mx;
  for (int it = 0; it < kBisect; ++it) {
    const double mid = 0.5 * (lo + hi);
    double s = 0.0;
    for (int64_t j = threadIdx.x; j < D; j += blockDim.x) s += fmax(fabs((double)d[j]) - mid, 0.0);
    s = block_sum<double>(s, shd);
    if (s > (double)eps) lo = mid; else hi = mid;
  }
  // exact theta on the active set {|d| > lo}
  double s = 0.0, c = 0.0;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    const double a = fabs((double)d[j]);
    if (a > lo) { s += a; c += 1.0; }
  }
  s = block_sum<double>(s, shd);
  c = block_sum<double>(c, shd);
  const T theta = (T)(c > 0 ? (s - (double)eps) / c : (double)mx);
  __syncthreads();
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    const T a = fabs(d[j]) - theta;
    const T sg = d[j] > T(0) ? T(1) : (d[j] < T(0) ? T(-1) : T(0));
    d[j] = a > T(0) ? sg * a : sg * T(0);
  }
  __syncthreads();
}

template <typename T>
__global__ void project_kernel(T* delta, int64_t D, int64_t rows_per_peer, const T* eps, int n_eps) {
  __shared__ double shd[32];
  __shared__ T sht[32];
  const int64_t r = blockIdx.x;
  project_row_dev<T>(delta + r * D, D, eps[n_eps == 1 ? 0 : r / rows_per_peer], shd, sht);
}

template <typename T>
__global__ void l2_kernel(T* xa, const T* g, const T* x, int64_t D, int64_t rows_per_peer, int64_t xN,
                          const T* eps, const T* step, int n_eps, int n_step) {
  __shared__ double shd[32];
  const int64_t r = blockIdx.x;
  const int64_t p = r / rows_per_peer;
  const T e = eps[n_eps == 1 ? 0 : p];
  const T st = step[n_step == 1 ? 0 : p];
  T* a = xa + r * D;
  const T* gr = g + r * D;
  const T* xr = x + (r * D) % xN;
  double gn = 0.0;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) gn += (double)gr[j] * gr[j];
  gn = block_sum<double>(gn, shd);
  const T den = (T)sqrt(gn) + (T)1e-12;
  double dn = 0.0;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    const T d = (a[j] + st * (gr[j] / den)) - xr[j];
    dn += (double)d * d;
  }
  dn = block_sum<double>(dn, shd);
  T f = e / ((T)sqrt(dn) + (T)1e-12);
  f = f > T(1) ? T(1) : f;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    const T d = (a[j] + st * (gr[j] / den)) - xr[j];
    a[j] = clamp01(xr[j] + d * f);
  }
}

// l1: one block per row; work = d buffer [R, D] (global scratch).
template <typename T>
__global__ void l1_kernel(T* xa, const T* g, const T* x, T* work, int64_t D, int64_t rows_per_peer, int64_t xN,
                          const T* eps, const T* step, int n_eps, int n_step, const int64_t* k) {
  __shared__ double shd[32];
  __shared__ T sht[32];
  __shared__ T best_v[32];
  __shared__ int64_t best_i[32];
  __shared__ int64_t chosen[kL1KMax];
  const int64_t r = blockIdx.x;
  const int64_t p = r / rows_per_peer;
  const T e = eps[n_eps == 1 ? 0 : p];
  const T st = step[n_step == 1 ? 0 : p];
  T* a = xa + r * D;
  const T* gr = g + r * D;
  const T* xr = x + (r * D) % xN;
  T* d = work + r * D;
  const int64_t kr = k[r];
  const int64_t k_cap = D < (int64_t)kL1KMax ? D : (int64_t)kL1KMax;  // no mixed-type min() overload on device
  const int kk = (int)(kr < k_cap ? kr : k_cap);
  // k rounds of (max score, lowest index reaching it), knocking out the chosen ones
  for (int q = 0; q < kk; ++q) {
    T bv = T(-1);
    int64_t bi = D;
    for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
      bool taken = false;
      for (int u = 0; u < q; ++u) taken |= (chosen[u] == j);
      if (taken) continue;
      const T gj = gr[j];
      const bool stuck = l1_stuck(a[j], gj, st);
      const T sc = stuck ? T(0) : fabs(gj);
      if (sc > bv || (sc == bv && j < bi)) { bv = sc; bi = j; }
    }
    for (int o = 16; o > 0; o >>= 1) {
      const T ov = __shfl_down_sync(0xffffffff, bv, o);
      const int64_t oi = __shfl_down_sync(0xffffffff, bi, o);
      if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    if (lane == 0) { best_v[w] = bv; best_i[w] = bi; }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int u = 1; u < (int)(blockDim.x >> 5); ++u)
        if (best_v[u] > best_v[0] || (best_v[u] == best_v[0] && best_i[u] < best_i[0])) {
          best_v[0] = best_v[u];
          best_i[0] = best_i[u];
        }
      chosen[q] = best_i[0];
    }
    __syncthreads();
  }
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) d[j] = a[j];
  __syncthreads();
  if (threadIdx.x == 0) {
    const T mag = (st * (T)kL1KMax) / (T)kr;
    for (int q = 0; q < kk; ++q) {
      const int64_t j = chosen[q];
      if (j >= D) continue;
      const T gj = gr[j];
      const bool stuck = l1_stuck(a[j], gj, st);
      if (!stuck) d[j] = a[j] + sign_step(gj, mag);
    }
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) d[j] = d[j] - xr[j];
  __syncthreads();
  project_row_dev<T>(d, D, e, shd, sht);
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) a[j] = clamp01(xr[j] + d[j]);
}

at::Tensor per_peer(double v, const c10::optional<at::Tensor>& t, const at::Tensor& like) {
  if (t.has_value()) return t->to(like.device(), like.scalar_type()).contiguous().reshape({-1});
  return at::full({1}, v, like.options());
}

int64_t peers_of(const at::Tensor& xa, const at::Tensor& e, const at::Tensor& s) {
  const int64_t P = std::max(e.numel(), s.numel());
  if (P > 1) TORCH_CHECK(xa.dim() == 5 && xa.size(0) == P, "fastcollab: per-peer eps/step need [P,B,C,H,W]");
  return P;
}

void pgd_step_cuda(at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x, double eps, double step,
                   const c10::optional<at::Tensor>& eps_t, const c10::optional<at::Tensor>& step_t,
                   c10::string_view norm, const c10::optional<at::Tensor>& l1_k) {
  TORCH_CHECK(x_adv.is_contiguous() && grad.is_contiguous() && x.is_contiguous(),
              "fastcollab cuda pgd_step_: tensors must be contiguous");
  if (x_adv.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x_adv.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor e = per_peer(eps, eps_t, x_adv), s = per_peer(step, step_t, x_adv);
  const int64_t P = peers_of(x_adv, e, s);
  const int64_t N = x_adv.numel();
  const int64_t D = x_adv.size(-1) * x_adv.size(-2) * x_adv.size(-3);
  const int64_t R = N / D;
  const std::string nm(norm);
  AT_DISPATCH_FLOATING_TYPES(x_adv.scalar_type(), "fastcollab_pgd_step_cuda", [&] {
    using T = scalar_t;
    if (nm == "linf") {
      const int64_t blocks = (N + kThreads - 1) / kThreads;
      linf_kernel<T><<<blocks, kThreads, 0, stream>>>(x_adv.data_ptr<T>(), grad.data_ptr<T>(), x.data_ptr<T>(), N,
                                                      N / P, x.numel(), e.data_ptr<T>(), s.data_ptr<T>(),
                                                      (int)e.numel(), (int)s.numel());
    } else if (nm == "l2") {
      l2_kernel<T><<<R, kThreads, 0, stream>>>(x_adv.data_ptr<T>(), grad.data_ptr<T>(), x.data_ptr<T>(), D, R / P,
                                               x.numel(), e.data_ptr<T>(), s.data_ptr<T>(), (int)e.numel(),
                                               (int)s.numel());
    } else if (nm == "l1") {
      TORCH_CHECK(l1_k.has_value(), "fastcollab cuda pgd_step_: l1 needs l1_k");
      at::Tensor k = l1_k->to(x_adv.device(), at::kLong).expand(x_adv.sizes().slice(0, x_adv.dim() - 3)).contiguous();
      at::Tensor work = at::empty_like(x_adv);
      l1_kernel<T><<<R, kThreads, 0, stream>>>(x_adv.data_ptr<T>(), grad.data_ptr<T>(), x.data_ptr<T>(),
                                               work.data_ptr<T>(), D, R / P, x.numel(), e.data_ptr<T>(),
                                               s.data_ptr<T>(), (int)e.numel(), (int)s.numel(), k.data_ptr<int64_t>());
    } else {
      TORCH_CHECK(false, "fastcollab cuda pgd_step_: unknown norm ", nm);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void project_l1_cuda(at::Tensor& delta, double eps, const c10::optional<at::Tensor>& eps_t) {
  TORCH_CHECK(delta.is_contiguous(), "fastcollab cuda project_l1_: delta must be contiguous");
  if (delta.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(delta.device());
  const at::Tensor e = per_peer(eps, eps_t, delta);
  const int64_t P = peers_of(delta, e, e);
  const int64_t D = delta.size(-1) * delta.size(-2) * delta.size(-3);
  const int64_t R = delta.numel() / D;
  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "fastcollab_project_l1_cuda", [&] {
    project_kernel<scalar_t><<<R, kThreads, 0, c10::cuda::getCurrentCUDAStream().stream()>>>(
        delta.data_ptr<scalar_t>(), D, R / P, e.data_ptr<scalar_t>(), (int)e.numel());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcollab, CUDA, m) {
  m.impl("native_pgd_step_", &pgd_step_cuda);
  m.impl("native_project_l1_", &project_l1_cuda);
}

}  // namespace fastcollab
