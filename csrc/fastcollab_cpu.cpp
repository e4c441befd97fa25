// fastcollab._C: operator schemas (TORCH_LIBRARY) and the CPU kernels (TORCH_LIBRARY_IMPL, CPU).
//
// These are the *native* backends of the public ops in fastcollab/ops.py; the public ops are Python
// custom ops (fastcollab::pgd_step, fastcollab::kl_div_fwd, ...) that dispatch here for backend "cpp".
// Semantics: fastcollab/reference.py (the truth every test compares against).
//
// * pgd_step linf is one fused, parallel (at::parallel_for), branch-free loop that GCC vectorises at
//   -O3; it repeats the reference's op order exactly (x-eps and x+eps in the tensor dtype, sign(0)=0,
//   sign(NaN)=0 as torch.sign) so it is bit-exact with the torch sequence. Built with
//   -ffp-contract=off and without fast-math.
// * l2 / l1 / project_l1 and the losses: parallel over rows, sums accumulated in double.
// * The loss kernels write d loss / d logits (upstream gradient 1) in the same pass as the loss.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

namespace fastcollab {
namespace {

constexpr double kNormEps = 1e-12;
constexpr int kL1KMax = 20;

// ------------------------------------------------------------------------------------------------
// shared helpers
// ------------------------------------------------------------------------------------------------
int64_t row_len(const at::Tensor& t) {
  TORCH_CHECK(t.dim() >= 3, "fastcollab: images must have at least 3 dims (C, H, W), got ", t.sizes());
  return t.size(-1) * t.size(-2) * t.size(-3);
}

// eps/step: a double, or a tensor that is 0-d or [P] (P = size of dim 0). Returns values cast to T,
// one per peer (length 1 when shared).
template <typename T>
std::vector<T> per_peer(double v, const c10::optional<at::Tensor>& t, at::ScalarType st) {
  if (!t.has_value()) return std::vector<T>{static_cast<T>(v)};
  at::Tensor c = t->to(at::kCPU).to(st).contiguous().reshape({-1});
  const T* p = c.data_ptr<T>();
  return std::vector<T>(p, p + c.numel());
}

template <typename T>
inline T sign_step(T g, T st) {
  // torch.sign(g) * step: +-step, and 0 for g == 0 or NaN.
  return g > T(0) ? st : (g < T(0) ? -st : T(0));
}

template <typename T>
inline bool l1_stuck(T a, T g, T st) {
  // l1 steepest-ascent mask of Maini et al. (robust_union, l1_dir_topk, gap = step): within one step of an
  // edge and moving towards it, or on / past an edge whatever the gradient
  return (a <= st && g < T(0)) || (a >= T(1) - st && g > T(0)) || a <= T(0) || a >= T(1);
}

template <typename T>
inline T clamp01(T t) {
  t = t < T(0) ? T(0) : t;
  return t > T(1) ? T(1) : t;
}

// Duchi et al. 2008 projection of one row onto the l1 ball (only if outside); buf has room for n.
template <typename T>
void project_row(T* d, int64_t n, T eps, std::vector<T>& buf) {
  double l1 = 0.0;
  for (int64_t j = 0; j < n; ++j) l1 += std::abs(static_cast<double>(d[j]));
  if (!(l1 > static_cast<double>(eps))) return;  // inside the ball: untouched
  buf.resize(n);
  for (int64_t j = 0; j < n; ++j) buf[j] = std::abs(d[j]);
  std::sort(buf.begin(), buf.end(), std::greater<T>());
  const double e = static_cast<double>(eps);
  double cs = 0.0, cs_rho = static_cast<double>(buf[0]);
  int64_t rho = 1;
  for (int64_t j = 0; j < n; ++j) {
    cs += static_cast<double>(buf[j]);
    if (static_cast<double>(buf[j]) * static_cast<double>(j + 1) > cs - e) {
      rho = j + 1;
      cs_rho = cs;
    }
  }
  const T theta = static_cast<T>((cs_rho - e) / static_cast<double>(rho));
  for (int64_t j = 0; j < n; ++j) {
    const T a = std::abs(d[j]) - theta;
    const T s = d[j] > T(0) ? T(1) : (d[j] < T(0) ? T(-1) : T(0));
    d[j] = a > T(0) ? s * a : s * T(0);
  }
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastcollab cpp kernels: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "fastcollab cpp kernels: ", name, " must be float32 or float64, got ", t.scalar_type(),
              " (upcast first)");
}

// ------------------------------------------------------------------------------------------------
// pgd_step
// ------------------------------------------------------------------------------------------------
template <typename T>
void linf_loop(T* __restrict__ xa, const T* __restrict__ g, const T* __restrict__ x, int64_t n, T e,
               T st) {
  for (int64_t i = 0; i < n; ++i) {
    T t = xa[i] + sign_step(g[i], st);
    const T xi = x[i];
    const T lo = xi - e;
    const T hi = xi + e;
    t = t < lo ? lo : t;
    t = t > hi ? hi : t;
    xa[i] = clamp01(t);
  }
}

template <typename T>
void pgd_linf(at::Tensor& xa, const at::Tensor& g, const at::Tensor& x, const std::vector<T>& ev,
              const std::vector<T>& sv, int64_t peers) {
  const int64_t N = xa.numel();
  const int64_t xN = x.numel();
  // segments on which eps/step are constant and x is contiguous (x may be one peer's worth, shared)
  const int64_t M = xN < N ? xN : N / peers;
  T* pxa = xa.data_ptr<T>();
  const T* pg = g.data_ptr<T>();
  const T* px = x.data_ptr<T>();
  at::parallel_for(0, N, 32768, [&](int64_t b, int64_t end) {
    int64_t i = b;
    while (i < end) {
      const int64_t seg = i / M;
      const int64_t seg_end = std::min(end, (seg + 1) * M);
      const int64_t p = i / (N / peers);
      const T e = ev.size() == 1 ? ev[0] : ev[p];
      const T st = sv.size() == 1 ? sv[0] : sv[p];
      linf_loop<T>(pxa + i, pg + i, px + (i % xN), seg_end - i, e, st);
      i = seg_end;
    }
  });
}

template <typename T>
void pgd_l2(at::Tensor& xa, const at::Tensor& g, const at::Tensor& x, const std::vector<T>& ev,
            const std::vector<T>& sv, int64_t peers) {
  const int64_t D = row_len(xa);
  const int64_t R = D == 0 ? 0 : xa.numel() / D;
  const int64_t rpp = R / peers;
  const int64_t xN = x.numel();
  T* pxa = xa.data_ptr<T>();
  const T* pg = g.data_ptr<T>();
  const T* px = x.data_ptr<T>();
  at::parallel_for(0, R, 1, [&](int64_t b, int64_t end) {
    for (int64_t r = b; r < end; ++r) {
      const int64_t p = r / rpp;
      const T e = ev.size() == 1 ? ev[0] : ev[p];
      const T st = sv.size() == 1 ? sv[0] : sv[p];
      T* a = pxa + r * D;
      const T* gr = pg + r * D;
      const T* xr = px + (r * D) % xN;
      double gn = 0.0;
      for (int64_t j = 0; j < D; ++j) gn += static_cast<double>(gr[j]) * gr[j];
      const T den = static_cast<T>(std::sqrt(gn)) + static_cast<T>(kNormEps);
      double dn = 0.0;
      for (int64_t j = 0; j < D; ++j) {
        const T d = (a[j] + st * (gr[j] / den)) - xr[j];
        dn += static_cast<double>(d) * d;
      }
      T f = e / (static_cast<T>(std::sqrt(dn)) + static_cast<T>(kNormEps));
      f = f > T(1) ? T(1) : f;
      for (int64_t j = 0; j < D; ++j) {
        const T d = (a[j] + st * (gr[j] / den)) - xr[j];
        a[j] = clamp01(xr[j] + d * f);
      }
    }
  });
}

template <typename T>
void pgd_l1(at::Tensor& xa, const at::Tensor& g, const at::Tensor& x, const std::vector<T>& ev,
            const std::vector<T>& sv, int64_t peers, const at::Tensor& k /*int64 [R]*/) {
  const int64_t D = row_len(xa);
  const int64_t R = D == 0 ? 0 : xa.numel() / D;
  const int64_t rpp = R / peers;
  const int64_t xN = x.numel();
  const int64_t kk = std::min<int64_t>(kL1KMax, D);
  T* pxa = xa.data_ptr<T>();
  const T* pg = g.data_ptr<T>();
  const T* px = x.data_ptr<T>();
  const int64_t* pk = k.data_ptr<int64_t>();
  at::parallel_for(0, R, 1, [&](int64_t b, int64_t end) {
    std::vector<T> d(D), buf(D);
    std::vector<T> top_s(kk + 1);
    std::vector<int64_t> top_i(kk + 1);
    for (int64_t r = b; r < end; ++r) {
      const int64_t p = r / rpp;
      const T e = ev.size() == 1 ? ev[0] : ev[p];
      const T st = sv.size() == 1 ? sv[0] : sv[p];
      T* a = pxa + r * D;
      const T* gr = pg + r * D;
      const T* xr = px + (r * D) % xN;
      // top-kk movable coordinates by |g| (ties: lowest index first)
      int64_t cnt = 0;
      for (int64_t j = 0; j < D; ++j) {
        const T gj = gr[j];
        const bool stuck = l1_stuck(a[j], gj, st);
        const T sc = stuck ? T(0) : std::abs(gj);
        if (cnt == kk && !(sc > top_s[kk - 1])) continue;
        int64_t pos = cnt < kk ? cnt : kk - 1;
        while (pos > 0 && sc > top_s[pos - 1]) {
          top_s[pos] = top_s[pos - 1];
          top_i[pos] = top_i[pos - 1];
          --pos;
        }
        top_s[pos] = sc;
        top_i[pos] = j;
        if (cnt < kk) ++cnt;
      }
      for (int64_t j = 0; j < D; ++j) d[j] = a[j];
      const int64_t kr = pk[r];
      const T mag = (st * static_cast<T>(kL1KMax)) / static_cast<T>(kr);
      const int64_t nsel = std::min<int64_t>(cnt, kr);
      for (int64_t q = 0; q < nsel; ++q) {
        const int64_t j = top_i[q];
        const T gj = gr[j];
        const bool stuck = l1_stuck(a[j], gj, st);
        if (!stuck) d[j] = a[j] + sign_step(gj, mag);
      }
      for (int64_t j = 0; j < D; ++j) d[j] = d[j] - xr[j];
      project_row<T>(d.data(), D, e, buf);
      for (int64_t j = 0; j < D; ++j) a[j] = clamp01(xr[j] + d[j]);
    }
  });
}

int64_t peers_of(const at::Tensor& xa, const c10::optional<at::Tensor>& eps_t,
                 const c10::optional<at::Tensor>& step_t) {
  int64_t P = 1;
  for (const auto* t : {&eps_t, &step_t}) {
    if (t->has_value() && (*t)->dim() > 0 && (*t)->numel() > 1) {
      TORCH_CHECK(xa.dim() == 5 && (*t)->numel() == xa.size(0),
                  "fastcollab: a per-peer eps/step needs x_adv [P,B,C,H,W] with P == its length");
      P = xa.size(0);
    }
  }
  return P;
}

void native_pgd_step_(at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x, double eps, double step,
                      const c10::optional<at::Tensor>& eps_t, const c10::optional<at::Tensor>& step_t,
                      c10::string_view norm, const c10::optional<at::Tensor>& l1_k) {
  check_float(x_adv, "x_adv");
  TORCH_CHECK(x_adv.is_contiguous() && grad.is_contiguous() && x.is_contiguous(),
              "fastcollab cpp pgd_step_: tensors must be contiguous");
  TORCH_CHECK(grad.scalar_type() == x_adv.scalar_type() && x.scalar_type() == x_adv.scalar_type(),
              "fastcollab cpp pgd_step_: dtypes differ");
  TORCH_CHECK(grad.numel() == x_adv.numel(), "fastcollab cpp pgd_step_: grad shape differs from x_adv");
  TORCH_CHECK(x.numel() > 0 && x_adv.numel() % x.numel() == 0,
              "fastcollab cpp pgd_step_: x must be shaped like x_adv or like one peer of it");
  if (x_adv.numel() == 0) return;
  const int64_t P = peers_of(x_adv, eps_t, step_t);
  const std::string nm(norm);
  AT_DISPATCH_FLOATING_TYPES(x_adv.scalar_type(), "fastcollab_pgd_step_", [&] {
    auto ev = per_peer<scalar_t>(eps, eps_t, x_adv.scalar_type());
    auto sv = per_peer<scalar_t>(step, step_t, x_adv.scalar_type());
    if (nm == "linf") {
      pgd_linf<scalar_t>(x_adv, grad, x, ev, sv, P);
    } else if (nm == "l2") {
      pgd_l2<scalar_t>(x_adv, grad, x, ev, sv, P);
    } else if (nm == "l1") {
      TORCH_CHECK(l1_k.has_value(), "fastcollab cpp pgd_step_: l1 needs l1_k (drawn by ops.py)");
      const int64_t R = x_adv.numel() / row_len(x_adv);
      at::Tensor k = l1_k->to(at::kCPU).to(at::kLong).contiguous();
      if (k.numel() != R) k = k.expand(x_adv.sizes().slice(0, x_adv.dim() - 3)).contiguous();
      TORCH_CHECK(k.numel() == R, "fastcollab cpp pgd_step_: l1_k must have one value per example");
      pgd_l1<scalar_t>(x_adv, grad, x, ev, sv, P, k);
    } else {
      TORCH_CHECK(false, "fastcollab cpp pgd_step_: unknown norm ", nm);
    }
  });
}

void native_project_l1_(at::Tensor& delta, double eps, const c10::optional<at::Tensor>& eps_t) {
  check_float(delta, "delta");
  TORCH_CHECK(delta.is_contiguous(), "fastcollab cpp project_l1_: delta must be contiguous");
  if (delta.numel() == 0) return;
  const int64_t P = peers_of(delta, eps_t, c10::nullopt);
  const int64_t D = row_len(delta);
  const int64_t R = delta.numel() / D;
  const int64_t rpp = R / P;
  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "fastcollab_project_l1_", [&] {
    auto ev = per_peer<scalar_t>(eps, eps_t, delta.scalar_type());
    scalar_t* pd = delta.data_ptr<scalar_t>();
    at::parallel_for(0, R, 1, [&](int64_t b, int64_t end) {
      std::vector<scalar_t> buf(D);
      for (int64_t r = b; r < end; ++r) {
        const scalar_t e = ev.size() == 1 ? ev[0] : ev[r / rpp];
        project_row<scalar_t>(pd + r * D, D, e, buf);
      }
    });
  });
}

// ------------------------------------------------------------------------------------------------
// losses: loss and d loss / d logits in one pass
// ------------------------------------------------------------------------------------------------
enum class Red { None, Sum, BatchMean, Mean };

Red parse_red(c10::string_view r) {
  const std::string s(r);
  if (s == "none") return Red::None;
  if (s == "sum") return Red::Sum;
  if (s == "batchmean") return Red::BatchMean;
  if (s == "mean") return Red::Mean;
  TORCH_CHECK(false, "fastcollab: unknown reduction ", s);
}

// out[c] = log_softmax(z * invT)[c]; returns nothing. Sums in double.
template <typename T>
inline void log_softmax_row(const T* z, int64_t C, T invT, T* out) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t c = 0; c < C; ++c) {
    const T u = z[c] * invT;
    out[c] = u;
    m = u > m ? u : m;
  }
  double s = 0.0;
  for (int64_t c = 0; c < C; ++c) s += std::exp(static_cast<double>(out[c] - m));
  const T lse = m + static_cast<T>(std::log(s));
  for (int64_t c = 0; c < C; ++c) out[c] = out[c] - lse;
}

template <typename T>
at::Tensor finish(const std::vector<double>& per, Red red, int64_t B, int64_t C, at::ScalarType st) {
  if (red == Red::None) {
    at::Tensor o = at::empty({B}, at::TensorOptions().dtype(st));
    T* po = o.data_ptr<T>();
    for (int64_t i = 0; i < B; ++i) po[i] = static_cast<T>(per[i]);
    return o;
  }
  double s = 0.0;
  for (double v : per) s += v;
  if (red == Red::BatchMean) s /= static_cast<double>(B);
  if (red == Red::Mean) s /= static_cast<double>(B) * static_cast<double>(C);
  at::Tensor o = at::empty({}, at::TensorOptions().dtype(st));
  o.data_ptr<T>()[0] = static_cast<T>(s);
  return o;
}

double red_scale(Red red, int64_t B, int64_t C) {
  if (red == Red::BatchMean) return 1.0 / static_cast<double>(B);
  if (red == Red::Mean) return 1.0 / (static_cast<double>(B) * static_cast<double>(C));
  return 1.0;
}

void check_logits(const at::Tensor& a, const char* name) {
  check_float(a, name);
  TORCH_CHECK(a.dim() == 2 && a.is_contiguous(), "fastcollab cpp: ", name, " must be contiguous [B, C]");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> native_kl_div_fwd(const at::Tensor& student, const at::Tensor& teacher,
                                                                 double T_, c10::string_view reduction,
                                                                 bool teacher_grad) {
  check_logits(student, "student");
  check_logits(teacher, "teacher");
  TORCH_CHECK(student.sizes() == teacher.sizes() && student.scalar_type() == teacher.scalar_type(),
              "fastcollab cpp kl_div: student/teacher differ in shape or dtype");
  const Red red = parse_red(reduction);
  const int64_t B = student.size(0), C = student.size(1);
  at::Tensor ds = at::empty_like(student);
  at::Tensor dt = teacher_grad ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  std::vector<double> per(B);
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES(student.scalar_type(), "fastcollab_kl_div_fwd", [&] {
    using T = scalar_t;
    const T invT = static_cast<T>(1.0 / T_);
    const T scale = static_cast<T>(red_scale(red, B, C));
    const T* ps = student.data_ptr<T>();
    const T* pt = teacher.data_ptr<T>();
    T* pds = ds.data_ptr<T>();
    T* pdt = teacher_grad ? dt.data_ptr<T>() : nullptr;
    at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)), [&](int64_t b, int64_t e) {
      std::vector<T> ls(C), lt(C);
      for (int64_t i = b; i < e; ++i) {
        log_softmax_row<T>(ps + i * C, C, invT, ls.data());
        log_softmax_row<T>(pt + i * C, C, invT, lt.data());
        double kl = 0.0;
        T* dsr = pds + i * C;
        for (int64_t c = 0; c < C; ++c) {
          const T p = std::exp(lt[c]);
          if (p > T(0)) kl += static_cast<double>(p) * static_cast<double>(lt[c] - ls[c]);
          dsr[c] = (std::exp(ls[c]) - p) * invT * scale;
        }
        per[i] = kl;
        if (teacher_grad) {
          T* dtr = pdt + i * C;
          const T klT = static_cast<T>(kl);
          for (int64_t c = 0; c < C; ++c) {
            const T p = std::exp(lt[c]);
            dtr[c] = p > T(0) ? p * ((lt[c] - ls[c]) - klT) * invT * scale : T(0);
          }
        }
      }
    });
    loss = finish<T>(per, red, B, C, student.scalar_type());
  });
  return {loss, ds, dt};
}

// boosted CE row: writes d/dz into g (unscaled); returns the loss.
template <typename T>
double bce_row(const T* z, int64_t C, int64_t y, T* lp, T* g) {
  TORCH_CHECK(y >= 0 && y < C, "fastcollab cpp boosted_ce: label ", y, " out of range [0, ", C, ")");
  log_softmax_row<T>(z, C, T(1), lp);
  int64_t m = -1;
  T pm = T(-1);
  for (int64_t c = 0; c < C; ++c) {
    if (c == y) continue;
    const T p = std::exp(lp[c]);
    if (p > pm) { pm = p; m = c; }
  }
  if (m < 0) pm = T(0);  // C == 1
  const T den = static_cast<T>(1.0001) - pm;
  const double loss = -static_cast<double>(lp[y]) - std::log(static_cast<double>(den));
  const T w = pm / den;
  for (int64_t c = 0; c < C; ++c) {
    const T p = std::exp(lp[c]);
    T v = p - (c == y ? T(1) : T(0));
    if (m >= 0) v += w * ((c == m ? T(1) : T(0)) - p);
    g[c] = v;
  }
  return loss;
}

std::tuple<at::Tensor, at::Tensor> native_boosted_ce_fwd(const at::Tensor& logits, const at::Tensor& y,
                                                         c10::string_view reduction) {
  check_logits(logits, "logits");
  const Red red = parse_red(reduction);
  TORCH_CHECK(red != Red::BatchMean, "fastcollab cpp boosted_ce: reduction must be mean, sum or none");
  const int64_t B = logits.size(0), C = logits.size(1);
  at::Tensor yl = y.to(at::kLong).contiguous();
  TORCH_CHECK(yl.numel() == B, "fastcollab cpp boosted_ce: y must be [B]");
  at::Tensor dz = at::empty_like(logits);
  std::vector<double> per(B);
  at::Tensor loss;
  const Red r2 = red == Red::Mean ? Red::BatchMean : red;  // mean over B
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "fastcollab_boosted_ce_fwd", [&] {
    using T = scalar_t;
    const T scale = static_cast<T>(red_scale(r2, B, C));
    const T* pz = logits.data_ptr<T>();
    const int64_t* py = yl.data_ptr<int64_t>();
    T* pd = dz.data_ptr<T>();
    at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)), [&](int64_t b, int64_t e) {
      std::vector<T> lp(C);
      for (int64_t i = b; i < e; ++i) {
        per[i] = bce_row<T>(pz + i * C, C, py[i], lp.data(), pd + i * C);
        for (int64_t c = 0; c < C; ++c) pd[i * C + c] *= scale;
      }
    });
    loss = finish<T>(per, r2, B, C, logits.scalar_type());
  });
  return {loss, dz};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> native_trades_kl_fwd(const at::Tensor& clean, const at::Tensor& adv,
                                                                    c10::string_view reduction) {
  // KL(p(clean) || p(adv)) == kl_div(student=adv, teacher=clean, T=1) with the teacher's gradient.
  auto out = native_kl_div_fwd(adv, clean, 1.0, reduction, true);
  return {std::get<0>(out), std::get<2>(out), std::get<1>(out)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> native_logit_mse_fwd(const at::Tensor& a, const at::Tensor& b,
                                                                    c10::string_view reduction) {
  check_float(a, "a");
  check_float(b, "b");
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && a.is_contiguous() &&
                  b.is_contiguous() && a.dim() >= 1,
              "fastcollab cpp logit_mse: a and b must be contiguous, same shape and dtype");
  const Red red = parse_red(reduction);
  TORCH_CHECK(red != Red::BatchMean, "fastcollab cpp logit_mse: reduction must be mean, sum or none");
  const int64_t B = a.size(0);
  const int64_t C = B == 0 ? 0 : a.numel() / B;
  at::Tensor da = at::empty_like(a), db = at::empty_like(b);
  std::vector<double> per(B);
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "fastcollab_logit_mse_fwd", [&] {
    using T = scalar_t;
    const T scale = static_cast<T>(2.0 * red_scale(red, B, C));
    const T* pa = a.data_ptr<T>();
    const T* pb = b.data_ptr<T>();
    T* pda = da.data_ptr<T>();
    T* pdb = db.data_ptr<T>();
    at::parallel_for(0, B, std::max<int64_t>(1, 8192 / std::max<int64_t>(C, 1)), [&](int64_t s, int64_t e) {
      for (int64_t i = s; i < e; ++i) {
        double acc = 0.0;
        for (int64_t c = i * C; c < (i + 1) * C; ++c) {
          const T d = pa[c] - pb[c];
          acc += static_cast<double>(d) * d;
          const T g = d * scale;
          pda[c] = g;
          pdb[c] = -g;
        }
        per[i] = acc;
      }
    });
    loss = finish<T>(per, red, B, C, a.scalar_type());
  });
  return {loss, da, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> native_mart_loss_fwd(const at::Tensor& clean, const at::Tensor& adv,
                                                                    const at::Tensor& y, double beta) {
  check_logits(clean, "clean");
  check_logits(adv, "adv");
  TORCH_CHECK(clean.sizes() == adv.sizes() && clean.scalar_type() == adv.scalar_type(),
              "fastcollab cpp mart_loss: clean/adv differ in shape or dtype");
  const int64_t B = clean.size(0), C = clean.size(1);
  at::Tensor yl = y.to(at::kLong).contiguous();
  TORCH_CHECK(yl.numel() == B, "fastcollab cpp mart_loss: y must be [B]");
  at::Tensor dc = at::empty_like(clean), da = at::empty_like(adv);
  std::vector<double> per(B);
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES(clean.scalar_type(), "fastcollab_mart_loss_fwd", [&] {
    using T = scalar_t;
    const T invB = static_cast<T>(1.0 / static_cast<double>(B));
    const T bt = static_cast<T>(beta);
    const T* pc = clean.data_ptr<T>();
    const T* pa = adv.data_ptr<T>();
    const int64_t* py = yl.data_ptr<int64_t>();
    T* pdc = dc.data_ptr<T>();
    T* pda = da.data_ptr<T>();
    at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)), [&](int64_t s, int64_t e) {
      std::vector<T> lc(C), la(C);
      for (int64_t i = s; i < e; ++i) {
        const int64_t yi = py[i];
        T* gc = pdc + i * C;
        T* ga = pda + i * C;
        const double bce = bce_row<T>(pa + i * C, C, yi, la.data(), ga);  // la = log p(adv)
        log_softmax_row<T>(pc + i * C, C, T(1), lc.data());
        double kl = 0.0;
        for (int64_t c = 0; c < C; ++c) {
          const T p = std::exp(lc[c]);
          if (p > T(0)) kl += static_cast<double>(p) * static_cast<double>(lc[c] - la[c]);
        }
        const T pcy = std::exp(lc[yi]);
        const T w = T(1) - pcy;
        const T klT = static_cast<T>(kl);
        for (int64_t c = 0; c < C; ++c) {
          const T p = std::exp(lc[c]);
          const T q = std::exp(la[c]);
          ga[c] = (ga[c] + bt * w * (q - p)) * invB;
          const T dkl = p > T(0) ? p * ((lc[c] - la[c]) - klT) : T(0);
          const T dpy = pcy * ((c == yi ? T(1) : T(0)) - p);
          gc[c] = bt * (w * dkl - klT * dpy) * invB;
        }
        per[i] = bce + static_cast<double>(beta) * kl * static_cast<double>(w);
      }
    });
    loss = finish<T>(per, Red::BatchMean, B, C, clean.scalar_type());
  });
  return {loss, dc, da};
}

// psi = cos(u, v), u = f(nat) - e_y, v = f(adv) - e_y; f = softmax or identity. Writes f(nat), f(adv)
// into a, b and, if gu/gv are given, d psi / d a and d psi / d b.
template <typename T>
T triangle_psi(const T* nat, const T* adv, int64_t C, int64_t y, bool probs, T* a, T* b, T* gu, T* gv) {
  if (probs) {
    log_softmax_row<T>(nat, C, T(1), a);
    log_softmax_row<T>(adv, C, T(1), b);
    for (int64_t c = 0; c < C; ++c) {
      a[c] = std::exp(a[c]);
      b[c] = std::exp(b[c]);
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      a[c] = nat[c];
      b[c] = adv[c];
    }
  }
  double uu = 0.0, vv = 0.0, uv = 0.0;
  for (int64_t c = 0; c < C; ++c) {
    const double u = static_cast<double>(a[c]) - (c == y ? 1.0 : 0.0);
    const double v = static_cast<double>(b[c]) - (c == y ? 1.0 : 0.0);
    uu += u * u;
    vv += v * v;
    uv += u * v;
  }
  const double nu_raw = std::sqrt(uu), nv_raw = std::sqrt(vv);
  const double nu = std::max(nu_raw, kNormEps), nv = std::max(nv_raw, kNormEps);
  const double psi = uv / (nu * nv);
  if (gu != nullptr) {
    const double cu = nu_raw > kNormEps ? psi / (nu * nu) : 0.0;
    const double cv = nv_raw > kNormEps ? psi / (nv * nv) : 0.0;
    for (int64_t c = 0; c < C; ++c) {
      const double u = static_cast<double>(a[c]) - (c == y ? 1.0 : 0.0);
      const double v = static_cast<double>(b[c]) - (c == y ? 1.0 : 0.0);
      gu[c] = static_cast<T>(v / (nu * nv) - cu * u);
      gv[c] = static_cast<T>(u / (nu * nv) - cv * v);
    }
  }
  return static_cast<T>(psi);
}

template <typename T>
void softmax_backward_inplace(T* g, const T* p, int64_t C) {
  double dot = 0.0;
  for (int64_t c = 0; c < C; ++c) dot += static_cast<double>(g[c]) * p[c];
  const T d = static_cast<T>(dot);
  for (int64_t c = 0; c < C; ++c) g[c] = p[c] * (g[c] - d);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> native_triangle_huber_fwd(
    const at::Tensor& s_nat, const at::Tensor& s_adv, const at::Tensor& t_nat, const at::Tensor& t_adv,
    const at::Tensor& y, double delta, bool use_probs) {
  for (auto* p : {&s_nat, &s_adv, &t_nat, &t_adv}) check_logits(*p, "logits");
  TORCH_CHECK(s_nat.sizes() == s_adv.sizes() && s_nat.sizes() == t_nat.sizes() && s_nat.sizes() == t_adv.sizes(),
              "fastcollab cpp triangle_huber: all logits must have the same shape");
  const int64_t B = s_nat.size(0), C = s_nat.size(1);
  at::Tensor yl = y.to(at::kLong).contiguous();
  TORCH_CHECK(yl.numel() == B, "fastcollab cpp triangle_huber: y must be [B]");
  at::Tensor dn = at::empty_like(s_nat), da = at::empty_like(s_adv);
  at::Tensor loss = at::empty({B}, s_nat.options());
  AT_DISPATCH_FLOATING_TYPES(s_nat.scalar_type(), "fastcollab_triangle_huber_fwd", [&] {
    using T = scalar_t;
    const T dl = static_cast<T>(delta);
    const T *psn = s_nat.data_ptr<T>(), *psa = s_adv.data_ptr<T>();
    const T *ptn = t_nat.data_ptr<T>(), *pta = t_adv.data_ptr<T>();
    const int64_t* py = yl.data_ptr<int64_t>();
    T *pdn = dn.data_ptr<T>(), *pda = da.data_ptr<T>(), *pl = loss.data_ptr<T>();
    at::parallel_for(0, B, std::max<int64_t>(1, 2048 / std::max<int64_t>(C, 1)), [&](int64_t s, int64_t e) {
      std::vector<T> a(C), b(C), ta(C), tb(C);
      for (int64_t i = s; i < e; ++i) {
        const int64_t yi = py[i];
        TORCH_CHECK(yi >= 0 && yi < C, "fastcollab cpp triangle_huber: label out of range");
        T* gn = pdn + i * C;
        T* ga = pda + i * C;
        const T ps = triangle_psi<T>(psn + i * C, psa + i * C, C, yi, use_probs, a.data(), b.data(), gn, ga);
        const T pt = triangle_psi<T>(ptn + i * C, pta + i * C, C, yi, use_probs, ta.data(), tb.data(), nullptr,
                                     nullptr);
        const T r = ps - pt;
        const T ar = std::abs(r);
        pl[i] = ar <= dl ? T(0.5) * r * r : dl * (ar - T(0.5) * dl);
        const T h = ar <= dl ? r : (r > T(0) ? dl : -dl);
        for (int64_t c = 0; c < C; ++c) {
          gn[c] *= h;
          ga[c] *= h;
        }
        if (use_probs) {
          softmax_backward_inplace<T>(gn, a.data(), C);
          softmax_backward_inplace<T>(ga, b.data(), C);
        }
      }
    });
  });
  return {loss, dn, da};
}

}  // namespace

TORCH_LIBRARY(fastcollab, m) {
  m.def("native_pgd_step_(Tensor(a!) x_adv, Tensor grad, Tensor x, float eps, float step, Tensor? eps_t, "
        "Tensor? step_t, str norm, Tensor? l1_k) -> ()");
  m.def("native_project_l1_(Tensor(a!) delta, float eps, Tensor? eps_t) -> ()");
  m.def("native_kl_div_fwd(Tensor student, Tensor teacher, float T, str reduction, bool teacher_grad) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("native_boosted_ce_fwd(Tensor logits, Tensor y, str reduction) -> (Tensor, Tensor)");
  m.def("native_trades_kl_fwd(Tensor clean, Tensor adv, str reduction) -> (Tensor, Tensor, Tensor)");
  m.def("native_logit_mse_fwd(Tensor a, Tensor b, str reduction) -> (Tensor, Tensor, Tensor)");
  m.def("native_mart_loss_fwd(Tensor clean, Tensor adv, Tensor y, float beta) -> (Tensor, Tensor, Tensor)");
  m.def("native_triangle_huber_fwd(Tensor s_nat, Tensor s_adv, Tensor t_nat, Tensor t_adv, Tensor y, "
        "float delta, bool use_probs) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastcollab, CPU, m) {
  m.impl("native_pgd_step_", &native_pgd_step_);
  m.impl("native_project_l1_", &native_project_l1_);
  m.impl("native_kl_div_fwd", &native_kl_div_fwd);
  m.impl("native_boosted_ce_fwd", &native_boosted_ce_fwd);
  m.impl("native_trades_kl_fwd", &native_trades_kl_fwd);
  m.impl("native_logit_mse_fwd", &native_logit_mse_fwd);
  m.impl("native_mart_loss_fwd", &native_mart_loss_fwd);
  m.impl("native_triangle_huber_fwd", &native_triangle_huber_fwd);
}

}  // namespace fastcollab

// An importable (empty) Python module, so `import fastcollab._C` loads the library above.
#include <Python.h>
static struct PyModuleDef fastcollab_C_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastcollab_C_module); }
