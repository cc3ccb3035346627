// Fused masked attention for XLA:CPU, forward and backward, as XLA FFI handlers
// (jaxalign/models/attention_cpu.py builds, registers and differentiates them).
//
//   q [B, T, H, D], k/v [B, S, KVH, D] (fp32, the models' own layout: no head transposes),
//   mask uint8 [B, T, S] (nonzero = the query may see the key), H = G * KVH (grouped queries).
//   Forward:  out [B, T, H, D] = softmax(scale * q k^T, masked) v, lse [B, H, T] the row's
//             log-sum-exp of the scaled scores (-inf for a row with no visible key: out = 0).
//   Backward: dq, dk, dv from q, k, v, out, lse, dout and the mask; the probabilities are
//             recomputed from lse (nothing of size T x S is stored between the two).
//
// Work: one task per (b, kv head), spread over `threads` threads; a task owns its dk/dv rows, so
// no two threads write the same output. Queries go in blocks of 8 rows; keys in tiles of 16. A
// key tile that no query of the block may see (mask all zero there) is skipped in every product:
// the causal upper triangle, padding, and the other continuation of a prefix-shared pair
// (jaxalign.data.prefix_sharing) cost nothing. Entries that are masked inside a computed tile
// get probability exactly 0.
//
// The inner loops are written with GCC/Clang vector extensions (16 floats), which compile to
// AVX-512 where the machine has it and to narrower SIMD elsewhere; the build allows FMA
// contraction.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <utility>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int W = 16;  // floats per vector; a key tile
constexpr int R = 8;   // query rows per block
typedef float vf __attribute__((vector_size(64)));
typedef float vfu __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint8_t vb __attribute__((vector_size(16), aligned(1)));

inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void store(float* p, vf x) { *reinterpret_cast<vfu*>(p) = x; }
inline vf splat(float x) { return vf{} + x; }

// exp(x) for x <= 0 (scores minus their row maximum; -inf and large negatives give 0): the
// usual 2^n * p(r) range reduction, degree-6 polynomial, about 1 ulp.
inline vf vexp(vf x) {
  const vf lo = splat(-87.0f);
  const vf zero = splat(0.0f);
  const auto under = x < lo;
  x = under ? lo : x;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf t = x * splat(1.44269504088896341f) + magic;
  const vf n = t - magic;
  vf r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  vf p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const vf y = p * scale;
  return under ? zero : y;
}

inline vf mask_vec(const uint8_t* m) {
  vb b;
  std::memcpy(&b, m, sizeof(b));
  return __builtin_convertvector(b, vf);
}

struct Dims {
  int64_t b, t, s, h, kvh, d, g, sp;  // sp: s rounded up to a whole tile
};

// dst[r][j] = sum_k a[r][k] * bt[k][j] for the rows of a block and the active key tiles.
// a: [R][d] (rows beyond `rows` are zero), bt: [d][sp], dst: [R][sp].
void Scores(const float* a, const float* bt, float* dst, const Dims& n, const uint8_t* active) {
  const int64_t tiles = n.sp / W;
  for (int64_t t0 = 0; t0 < tiles; ++t0) {
    if (!active[t0]) continue;
    const bool pair = t0 + 1 < tiles && active[t0 + 1];
    const int64_t j = t0 * W;
    vf acc0[R], acc1[R];
    for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = splat(0.0f);
    if (pair) {
      for (int64_t k = 0; k < n.d; ++k) {
        const vf b0 = load(bt + k * n.sp + j), b1 = load(bt + k * n.sp + j + W);
        for (int r = 0; r < R; ++r) {
          const float x = a[r * n.d + k];
          acc0[r] += x * b0;
          acc1[r] += x * b1;
        }
      }
      for (int r = 0; r < R; ++r) {
        store(dst + r * n.sp + j, acc0[r]);
        store(dst + r * n.sp + j + W, acc1[r]);
      }
      ++t0;
    } else {
      for (int64_t k = 0; k < n.d; ++k) {
        const vf b0 = load(bt + k * n.sp + j);
        for (int r = 0; r < R; ++r) acc0[r] += a[r * n.d + k] * b0;
      }
      for (int r = 0; r < R; ++r) store(dst + r * n.sp + j, acc0[r]);
    }
  }
}

// out[r0..r0+3][c..c+NV*W) = sum_j p[r][j] * m[j][c..] over the active tiles (NV vectors).
template <int NV>
void MixChunk(const float* p, const float* m, int64_t m_stride, float* out, const Dims& n,
              const uint8_t* active, int r0, int64_t c) {
  const int64_t tiles = n.sp / W;
  vf acc[4][NV];
  for (int r = 0; r < 4; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = splat(0.0f);
  for (int64_t t0 = 0; t0 < tiles; ++t0) {
    if (!active[t0]) continue;
    const int64_t j_end = std::min<int64_t>((t0 + 1) * W, n.s);
    for (int64_t j = t0 * W; j < j_end; ++j) {
      const float* mj = m + j * m_stride + c;
      vf mv[NV];
      for (int v = 0; v < NV; ++v) mv[v] = load(mj + v * W);
      for (int r = 0; r < 4; ++r) {
        const float x = p[(r0 + r) * n.sp + j];
        for (int v = 0; v < NV; ++v) acc[r][v] += x * mv[v];
      }
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int v = 0; v < NV; ++v) store(out + (r0 + r) * n.d + c + v * W, acc[r][v]);
}

// out[r][:] = sum_j p[r][j] * m[j][:] over the active tiles, rows in fours, d in chunks of up to
// 4 vectors. p: [R][sp]; m row j at m + j * m_stride; out: [R][d].
void Mix(const float* p, const float* m, int64_t m_stride, float* out, const Dims& n,
         const uint8_t* active) {
  for (int r0 = 0; r0 < R; r0 += 4) {
    for (int64_t c = 0; c < n.d; c += 4 * W) {
      switch (std::min<int64_t>(4, (n.d - c) / W)) {
        case 4: MixChunk<4>(p, m, m_stride, out, n, active, r0, c); break;
        case 3: MixChunk<3>(p, m, m_stride, out, n, active, r0, c); break;
        case 2: MixChunk<2>(p, m, m_stride, out, n, active, r0, c); break;
        default: MixChunk<1>(p, m, m_stride, out, n, active, r0, c); break;
      }
    }
  }
}

// acc[j][c..c+NV*W) += sum_t p[t][j] * x[t][c..] for keys j0..j0+3 (j0 + 4 <= sp) and the rows t
// of the blocks that see the keys' tile. p: [rows][sp], x: [rows][d], acc: [sp][d].
template <int NV>
void AccumulateChunk(const float* p, const float* x, float* acc, const Dims& n,
                     const uint8_t* active, int64_t blocks, int64_t rows, int64_t j0, int64_t c) {
  const int64_t tiles = n.sp / W;
  const int64_t tile = j0 / W;
  vf a[4][NV];
  for (int i = 0; i < 4; ++i)
    for (int v = 0; v < NV; ++v) a[i][v] = load(acc + (j0 + i) * n.d + c + v * W);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    if (!active[blk * tiles + tile]) continue;
    const int64_t t_end = std::min<int64_t>((blk + 1) * R, rows);
    for (int64_t t = blk * R; t < t_end; ++t) {
      vf xv[NV];
      for (int v = 0; v < NV; ++v) xv[v] = load(x + t * n.d + c + v * W);
      const float* pt = p + t * n.sp + j0;
      for (int i = 0; i < 4; ++i) {
        const float w = pt[i];
        for (int v = 0; v < NV; ++v) a[i][v] += w * xv[v];
      }
    }
  }
  for (int i = 0; i < 4; ++i)
    for (int v = 0; v < NV; ++v) store(acc + (j0 + i) * n.d + c + v * W, a[i][v]);
}

// acc[j][:] += sum_t p[t][j] * x[t][:] (the transposed products of the backward pass) for the
// `rows` rows of a chunk of query blocks; active: [blocks][tiles].
void Accumulate(const float* p, const float* x, float* acc, const Dims& n, const uint8_t* active,
                int64_t rows) {
  const int64_t tiles = n.sp / W;
  const int64_t blocks = (rows + R - 1) / R;
  for (int64_t tile = 0; tile < tiles; ++tile) {
    bool any = false;
    for (int64_t blk = 0; blk < blocks && !any; ++blk) any = active[blk * tiles + tile];
    if (!any) continue;
    for (int64_t j0 = tile * W; j0 < (tile + 1) * W; j0 += 4) {
      for (int64_t c = 0; c < n.d; c += 4 * W) {
        switch (std::min<int64_t>(4, (n.d - c) / W)) {
          case 4: AccumulateChunk<4>(p, x, acc, n, active, blocks, rows, j0, c); break;
          case 3: AccumulateChunk<3>(p, x, acc, n, active, blocks, rows, j0, c); break;
          case 2: AccumulateChunk<2>(p, x, acc, n, active, blocks, rows, j0, c); break;
          default: AccumulateChunk<1>(p, x, acc, n, active, blocks, rows, j0, c); break;
        }
      }
    }
  }
}

// Which key tiles any of the block's rows may see.
void ActiveTiles(const uint8_t* mask_rows, int rows, const Dims& n, uint8_t* active) {
  const int64_t tiles = n.sp / W;
  for (int64_t t0 = 0; t0 < tiles; ++t0) {
    const int64_t j0 = t0 * W, j1 = std::min<int64_t>(j0 + W, n.s);
    bool any = false;
    for (int r = 0; r < rows && !any; ++r) {
      const uint8_t* m = mask_rows + r * n.s;
      if (j1 - j0 == W) {  // a whole tile: two 8-byte words
        uint64_t w[2];
        std::memcpy(w, m + j0, sizeof(w));
        any = (w[0] | w[1]) != 0;
      } else {
        for (int64_t j = j0; j < j1; ++j) any |= m[j] != 0;
      }
    }
    active[t0] = any;
  }
}

// The block's probabilities in place of its scaled scores: p = exp(s - lse) where the mask allows
// and the row has a visible key, else 0. With `lse_out` (forward) the row's lse is computed
// first (max, then the sum of exponentials) and written there; the probabilities are then
// unnormalised exp(s - max) and `inv_sum` gets 1 / sum (0 for rows without a visible key).
void Probabilities(float* s, const uint8_t* mask_rows, int rows, const Dims& n,
                   const uint8_t* active, const float* lse_in, float* lse_out, float* inv_sum) {
  const int64_t tiles = n.sp / W;
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int r = 0; r < R; ++r) {
    float* sr = s + r * n.sp;
    const uint8_t* mr = mask_rows + r * n.s;
    float shift;
    if (r >= rows) {
      shift = ninf;
    } else if (lse_out != nullptr) {
      vf mx = splat(ninf);
      for (int64_t t0 = 0; t0 < tiles; ++t0) {
        if (!active[t0]) continue;
        const int64_t j = t0 * W;
        vf sv = load(sr + j);
        if (j + W <= n.s) {
          sv = mask_vec(mr + j) != 0 ? sv : splat(ninf);
        } else {
          for (int64_t l = 0; l < W; ++l) sv[l] = (j + l < n.s && mr[j + l]) ? sv[l] : ninf;
        }
        store(sr + j, sv);
        mx = mx > sv ? mx : sv;
      }
      shift = ninf;
      for (int l = 0; l < W; ++l) shift = std::max(shift, mx[l]);
    } else {
      shift = lse_in[r];
    }
    const bool valid = shift != ninf;
    vf sum = splat(0.0f);
    for (int64_t t0 = 0; t0 < tiles; ++t0) {
      if (!active[t0]) continue;
      const int64_t j = t0 * W;
      vf sv = load(sr + j);
      vf pv;
      if (!valid) {
        pv = splat(0.0f);
      } else if (lse_out != nullptr) {  // masked entries already hold -inf
        pv = vexp(sv - shift);
      } else if (j + W <= n.s) {
        pv = mask_vec(mr + j) != 0 ? vexp(sv - shift) : splat(0.0f);
      } else {
        pv = vexp(sv - shift);
        for (int64_t l = 0; l < W; ++l) pv[l] = (j + l < n.s && mr[j + l]) ? pv[l] : 0.0f;
      }
      store(sr + j, pv);
      sum += pv;
    }
    if (lse_out != nullptr && r < rows) {
      float total = 0.0f;
      for (int l = 0; l < W; ++l) total += sum[l];
      lse_out[r] = valid ? shift + std::log(total) : ninf;
      inv_sum[r] = valid ? 1.0f / total : 0.0f;
    }
  }
}

// body(task, worker) for every task in [0, tasks) on up to `threads` workers (worker < threads):
// the calling thread and threads-1 helpers scheduled on XLA's own intra-op thread pool (threads of
// our own would compete with XLA's for the cores). One worker when the call has fewer than
// kMinWork multiply-adds. Returns when every task is done; a helper that starts later finds no
// task left and touches only the shared counters.
void ParallelFor(ffi::ThreadPool& pool, int64_t tasks, int64_t threads, int64_t multiply_adds,
                 const std::function<void(int64_t, int64_t)>& body) {
  constexpr int64_t kMinWork = int64_t{1} << 21;
  const int64_t n = multiply_adds < kMinWork ? 1 : std::max<int64_t>(1, std::min(threads, tasks));
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counters = std::make_shared<Counters>();
  const auto* fn = &body;
  auto work = [counters, tasks, fn](int64_t worker) {
    for (int64_t i = counters->next.fetch_add(1); i < tasks; i = counters->next.fetch_add(1)) {
      (*fn)(i, worker);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t w = 1; w < n; ++w) pool.Schedule([work, w]() { work(w); });
  work(0);
  while (counters->done.load(std::memory_order_acquire) < tasks) std::this_thread::yield();
}

// Rows x[j * stride + k] (j < s) transposed into out[k][j] ([d][sp], zero beyond s); 16 keys at a
// time, so the writes of one k fill a cache line and the 16 source rows stay in cache across k.
void Transpose(const float* x, int64_t stride, const Dims& n, float* out) {
  for (int64_t j0 = 0; j0 < n.sp; j0 += W) {
    const int64_t j1 = std::min<int64_t>(j0 + W, n.s);
    for (int64_t k = 0; k < n.d; ++k) {
      float* o = out + k * n.sp + j0;
      int64_t j = j0;
      for (; j < j1; ++j) o[j - j0] = x[j * stride + k];
      for (; j < j0 + W; ++j) o[j - j0] = 0.0f;
    }
  }
}

// Rotary position embedding applied inside the kernel (Hugging Face's rotate_half layout):
// rope(x) = x * cos + rot(x) * sin, rot(x) = concat(-x2, x1) for the halves x1, x2 of d; the
// tables cos/sin are [B, S, d] (self-attention: S = T). Without tables both are the identity.
struct Rope {
  const float* cos = nullptr;
  const float* sin = nullptr;
  int64_t s = 0, d = 0;
  // out = mul * rope(x) for the token at (b, pos)
  void Apply(const float* x, int64_t b, int64_t pos, float* out, float mul) const {
    if (cos == nullptr) {
      for (int64_t c = 0; c < d; ++c) out[c] = x[c] * mul;
      return;
    }
    const float* cr = cos + (b * s + pos) * d;
    const float* sr = sin + (b * s + pos) * d;
    const int64_t h = d / 2;
    for (int64_t c = 0; c < h; ++c) out[c] = mul * (x[c] * cr[c] - x[c + h] * sr[c]);
    for (int64_t c = h; c < d; ++c) out[c] = mul * (x[c] * cr[c] + x[c - h] * sr[c]);
  }
  // out = mul * rope^T(g): the gradient of x from the gradient g of rope(x)
  void Undo(const float* g, int64_t b, int64_t pos, float* out, float mul) const {
    if (cos == nullptr) {
      for (int64_t c = 0; c < d; ++c) out[c] = g[c] * mul;
      return;
    }
    const float* cr = cos + (b * s + pos) * d;
    const float* sr = sin + (b * s + pos) * d;
    const int64_t h = d / 2;
    for (int64_t c = 0; c < h; ++c) out[c] = mul * (g[c] * cr[c] + g[c + h] * sr[c + h]);
    for (int64_t c = h; c < d; ++c) out[c] = mul * (g[c] * cr[c] - g[c - h] * sr[c - h]);
  }
};

// The keys of one (b, kv head) as rows the products can use: k itself (stride kvh * d) or, with
// rope, the rotated rows written to `rotated` ([s][d], stride d). Returns (rows, stride).
std::pair<const float*, int64_t> KeyRows(const float* kp, const Rope& rope, const Dims& n,
                                         int64_t b, int64_t kv, float* rotated) {
  const float* base = kp + (b * n.s * n.kvh + kv) * n.d;
  if (rope.cos == nullptr) return {base, n.kvh * n.d};
  for (int64_t j = 0; j < n.s; ++j) rope.Apply(base + j * n.kvh * n.d, b, j, rotated + j * n.d, 1.0f);
  return {rotated, n.d};
}

ffi::Error CheckDims(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                     const ffi::Buffer<ffi::F32>& v, const ffi::Buffer<ffi::U8>& mask, Dims* n) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || md.size() != 3)
    return ffi::Error::InvalidArgument("attention: q/k/v must be 4-D and the mask 3-D");
  n->b = qd[0], n->t = qd[1], n->h = qd[2], n->d = qd[3];
  n->s = kd[1], n->kvh = kd[2];
  if (kd[0] != n->b || kd[3] != n->d || vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[2] ||
      vd[3] != kd[3] || md[0] != n->b || md[1] != n->t || md[2] != n->s)
    return ffi::Error::InvalidArgument("attention: q/k/v/mask shapes disagree");
  if (n->kvh <= 0 || n->h % n->kvh != 0 || n->d % W != 0)
    return ffi::Error::InvalidArgument("attention: need H a multiple of KVH and D of 16");
  n->g = n->h / n->kvh;
  n->sp = (n->s + W - 1) / W * W;
  return ffi::Error::Success();
}

// The dimensions of q/k/v/mask and, when cos/sin are not empty, the rope tables (module doc).
ffi::Error CheckInputs(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                       const ffi::Buffer<ffi::F32>& v, const ffi::Buffer<ffi::U8>& mask,
                       const ffi::Buffer<ffi::F32>& cos, const ffi::Buffer<ffi::F32>& sin, Dims* n,
                       Rope* rope) {
  if (auto e = CheckDims(q, k, v, mask, n); e.failure()) return e;
  rope->d = n->d;
  if (cos.element_count() == 0 && sin.element_count() == 0) return ffi::Error::Success();
  auto cd = cos.dimensions(), sd = sin.dimensions();
  if (cd.size() != 3 || sd.size() != 3 || cd[0] != n->b || cd[1] != n->s || cd[2] != n->d ||
      sd[0] != cd[0] || sd[1] != cd[1] || sd[2] != cd[2] || n->s != n->t || n->d % 2 != 0)
    return ffi::Error::InvalidArgument("attention: rope tables must be [B, T, D] with S = T");
  rope->cos = cos.typed_data(), rope->sin = sin.typed_data(), rope->s = n->s;
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::U8> mask, ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse, float scale,
                   int64_t threads) {
  Dims n;
  Rope rope;
  if (auto e = CheckInputs(q, k, v, mask, cos, sin, &n, &rope); e.failure()) return e;
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  const uint8_t* mp = mask.typed_data();
  float* op = out->typed_data();
  float* lp = lse->typed_data();
  struct Scratch {
    std::vector<float> kt, krot, qs, s, o, lse_blk, inv;
    std::vector<uint8_t> active;
  };
  std::vector<Scratch> scratch(std::max<int64_t>(1, threads));
  ParallelFor(pool, n.b * n.kvh, threads, n.b * n.h * n.t * n.s * n.d, [&](int64_t task, int64_t worker) {
    const int64_t b = task / n.kvh, kv = task % n.kvh;
    Scratch& w = scratch[worker];
    if (w.kt.empty()) {
      w.kt.resize(n.d * n.sp), w.qs.resize(R * n.d), w.s.resize(R * n.sp), w.o.resize(R * n.d);
      w.lse_blk.resize(R), w.inv.resize(R), w.active.resize(n.sp / W);
      if (rope.cos != nullptr) w.krot.resize(n.s * n.d);
    }
    auto &kt = w.kt, &qs = w.qs, &s = w.s, &o = w.o, &lse_blk = w.lse_blk, &inv = w.inv;
    auto& active = w.active;
    const auto [krows, kstride] = KeyRows(kp, rope, n, b, kv, w.krot.data());
    Transpose(krows, kstride, n, kt.data());
    const float* vrows = vp + (b * n.s * n.kvh + kv) * n.d;
    for (int64_t gi = 0; gi < n.g; ++gi) {
      const int64_t h = kv * n.g + gi;
      for (int64_t t0 = 0; t0 < n.t; t0 += R) {
        const int rows = static_cast<int>(std::min<int64_t>(R, n.t - t0));
        const uint8_t* mrows = mp + (b * n.t + t0) * n.s;
        std::fill(qs.begin(), qs.end(), 0.0f);
        for (int r = 0; r < rows; ++r) {
          rope.Apply(qp + ((b * n.t + t0 + r) * n.h + h) * n.d, b, t0 + r, qs.data() + r * n.d, scale);
        }
        ActiveTiles(mrows, rows, n, active.data());
        Scores(qs.data(), kt.data(), s.data(), n, active.data());
        Probabilities(s.data(), mrows, rows, n, active.data(), nullptr, lse_blk.data(), inv.data());
        Mix(s.data(), vrows, n.kvh * n.d, o.data(), n, active.data());
        for (int r = 0; r < rows; ++r) {
          float* orow = op + ((b * n.t + t0 + r) * n.h + h) * n.d;
          for (int64_t c = 0; c < n.d; ++c) orow[c] = o[r * n.d + c] * inv[r];
          lp[(b * n.h + h) * n.t + t0 + r] = lse_blk[r];
        }
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::U8> mask, ffi::Buffer<ffi::F32> cos,
                    ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::F32> out,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv, float scale, int64_t threads) {
  Dims n;
  Rope rope;
  if (auto e = CheckInputs(q, k, v, mask, cos, sin, &n, &rope); e.failure()) return e;
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  const uint8_t* mp = mask.typed_data();
  const float* op = out.typed_data();
  const float* lp = lse.typed_data();
  const float* dop = dout.typed_data();
  float* dqp = dq->typed_data();
  float* dkp = dk->typed_data();
  float* dvp = dv->typed_data();
  constexpr int64_t kChunk = 8 * R;  // query rows whose P and dS are kept for dK and dV
  const int64_t tiles = n.sp / W;
  struct Scratch {
    std::vector<float> kt, vt, krot, qs, dos, p, ds, dqb, dk_acc, dv_acc, lse_blk, delta;
    std::vector<uint8_t> active;
  };
  std::vector<Scratch> scratch(std::max<int64_t>(1, threads));
  ParallelFor(pool, n.b * n.kvh, threads, n.b * n.h * n.t * n.s * n.d, [&](int64_t task, int64_t worker) {
    const int64_t b = task / n.kvh, kv = task % n.kvh;
    Scratch& w = scratch[worker];
    if (w.kt.empty()) {
      w.kt.resize(n.d * n.sp), w.vt.resize(n.d * n.sp), w.qs.resize(kChunk * n.d);
      w.dos.resize(kChunk * n.d), w.p.resize(kChunk * n.sp), w.ds.resize(kChunk * n.sp);
      w.dqb.resize(R * n.d), w.dk_acc.resize(n.sp * n.d), w.dv_acc.resize(n.sp * n.d);
      w.lse_blk.resize(R), w.delta.resize(R), w.active.resize((kChunk / R) * tiles);
      if (rope.cos != nullptr) w.krot.resize(n.s * n.d);
    }
    auto &kt = w.kt, &vt = w.vt, &qs = w.qs, &dos = w.dos, &p = w.p, &ds = w.ds, &dqb = w.dqb;
    auto &dk_acc = w.dk_acc, &dv_acc = w.dv_acc, &lse_blk = w.lse_blk, &delta = w.delta;
    auto& active = w.active;
    std::fill(dk_acc.begin(), dk_acc.end(), 0.0f);
    std::fill(dv_acc.begin(), dv_acc.end(), 0.0f);
    const auto [krows, kstride] = KeyRows(kp, rope, n, b, kv, w.krot.data());
    Transpose(krows, kstride, n, kt.data());
    Transpose(vp + (b * n.s * n.kvh + kv) * n.d, n.kvh * n.d, n, vt.data());
    for (int64_t gi = 0; gi < n.g; ++gi) {
      const int64_t h = kv * n.g + gi;
      for (int64_t c0 = 0; c0 < n.t; c0 += kChunk) {
        const int64_t chunk_rows = std::min<int64_t>(kChunk, n.t - c0);
        std::fill(qs.begin(), qs.end(), 0.0f);
        std::fill(dos.begin(), dos.end(), 0.0f);
        for (int64_t t0 = c0; t0 < c0 + chunk_rows; t0 += R) {
          const int64_t blk = (t0 - c0) / R;
          const int rows = static_cast<int>(std::min<int64_t>(R, n.t - t0));
          const uint8_t* mrows = mp + (b * n.t + t0) * n.s;
          float* qb = qs.data() + (t0 - c0) * n.d;
          float* dob = dos.data() + (t0 - c0) * n.d;
          float* pb = p.data() + (t0 - c0) * n.sp;
          float* dsb = ds.data() + (t0 - c0) * n.sp;
          uint8_t* act = active.data() + blk * tiles;
          for (int r = 0; r < R; ++r) {
            lse_blk[r] = -std::numeric_limits<float>::infinity();
            delta[r] = 0.0f;
          }
          for (int r = 0; r < rows; ++r) {
            const int64_t row = (b * n.t + t0 + r) * n.h + h;
            float dot = 0.0f;
            rope.Apply(qp + row * n.d, b, t0 + r, qb + r * n.d, scale);
            for (int64_t c = 0; c < n.d; ++c) {
              dob[r * n.d + c] = dop[row * n.d + c];
              dot += dop[row * n.d + c] * op[row * n.d + c];
            }
            delta[r] = dot;
            lse_blk[r] = lp[(b * n.h + h) * n.t + t0 + r];
          }
          ActiveTiles(mrows, rows, n, act);
          Scores(qb, kt.data(), pb, n, act);
          Probabilities(pb, mrows, rows, n, act, lse_blk.data(), nullptr, nullptr);
          Scores(dob, vt.data(), dsb, n, act);
          for (int r = 0; r < R; ++r) {  // dS = P * (dP - delta), in place of dP
            for (int64_t t1 = 0; t1 < tiles; ++t1) {
              if (!act[t1]) continue;
              const int64_t j = t1 * W;
              store(dsb + r * n.sp + j, load(pb + r * n.sp + j) * (load(dsb + r * n.sp + j) - delta[r]));
            }
          }
          Mix(dsb, krows, kstride, dqb.data(), n, act);
          for (int r = 0; r < rows; ++r)
            rope.Undo(dqb.data() + r * n.d, b, t0 + r, dqp + ((b * n.t + t0 + r) * n.h + h) * n.d, scale);
        }
        Accumulate(p.data(), dos.data(), dv_acc.data(), n, active.data(), chunk_rows);
        Accumulate(ds.data(), qs.data(), dk_acc.data(), n, active.data(), chunk_rows);  // qs: scaled
      }
    }
    for (int64_t j = 0; j < n.s; ++j) {
      const int64_t row = ((b * n.s + j) * n.kvh + kv) * n.d;
      rope.Undo(dk_acc.data() + j * n.d, b, j, dkp + row, 1.0f);
      std::memcpy(dvp + row, dv_acc.data() + j * n.d, n.d * sizeof(float));
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxalignAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxalignAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("threads"));
