// NF4 dequantization for XLA:CPU, an XLA FFI handler (jaxalign/quant/nf4_cpu.py builds and
// registers it): out[2i] = NF4[codes[i] >> 4] * scale[2i / block_size] and
// out[2i + 1] = NF4[codes[i] & 15] * scale[(2i + 1) / block_size], one fp32 product per element
// (bit for bit what XLA's fused loop and bitsandbytes compute).
//
// With AVX-512 one permute looks up 16 codes in the 16-entry codebook, two more interleave the
// high and low nibbles, and non-temporal stores write the output without reading it first; the
// output is split over `threads` threads in whole blocks. Elsewhere a scalar loop.
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

alignas(64) const float kNf4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// Elements [begin, end) of the output (begin a multiple of block_size, which is even).
void Range(const uint8_t* codes, const float* scale, float* out, int64_t begin, int64_t end,
           int64_t block_size) {
  int64_t j = begin;
#if defined(__AVX512F__)
  if (block_size % 32 == 0) {
    const __m512 lut = _mm512_load_ps(kNf4);
    const __m512i lo_idx = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi_idx = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    const __m512i fifteen = _mm512_set1_epi32(15);
    const bool stream = reinterpret_cast<uintptr_t>(out) % 64 == 0;
    for (; j + 32 <= end; j += 32) {  // 16 bytes -> 32 outputs, all in one block
      const __m512 s = _mm512_set1_ps(scale[j / block_size]);
      const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + j / 2)));
      const __m512 hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(w, 4), lut), s);
      const __m512 lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(w, fifteen), lut), s);
      const __m512 a = _mm512_permutex2var_ps(hi, lo_idx, lo), b = _mm512_permutex2var_ps(hi, hi_idx, lo);
      if (stream) {  // write-only output: non-temporal stores skip reading the lines first
        _mm512_stream_ps(out + j, a);
        _mm512_stream_ps(out + j + 16, b);
      } else {
        _mm512_storeu_ps(out + j, a);
        _mm512_storeu_ps(out + j + 16, b);
      }
    }
  }
    _mm_sfence();
#endif
  for (; j < end; ++j) {
    const uint8_t c = codes[j / 2];
    out[j] = kNf4[(j % 2 == 0) ? (c >> 4) : (c & 15)] * scale[j / block_size];
  }
}

ffi::Error Dequantize(ffi::Buffer<ffi::U8> codes, ffi::Buffer<ffi::F32> scale,
                      ffi::ResultBuffer<ffi::F32> out, int64_t block_size, int64_t threads) {
  const int64_t n = static_cast<int64_t>(out->element_count());
  if (block_size <= 0 || block_size % 2 != 0) {
    return ffi::Error::InvalidArgument("block_size must be positive and even");
  }
  if (static_cast<int64_t>(codes.element_count()) * 2 < n ||
      static_cast<int64_t>(scale.element_count()) * block_size < n) {
    return ffi::Error::InvalidArgument("codes or scales are shorter than the output needs");
  }
  const uint8_t* c = codes.typed_data();
  const float* s = scale.typed_data();
  float* o = out->typed_data();
  int64_t t = std::max<int64_t>(1, threads);
  const int64_t min_per_thread = 1 << 18;
  t = std::min<int64_t>(t, std::max<int64_t>(1, n / min_per_thread));
  if (t == 1) {
    Range(c, s, o, 0, n, block_size);
    return ffi::Error::Success();
  }
  const int64_t chunk = ((n / t + block_size - 1) / block_size) * block_size;
  std::vector<std::thread> pool;
  for (int64_t k = 1; k < t; ++k) {
    const int64_t b = std::min(n, k * chunk), e = std::min(n, (k + 1) * chunk);
    if (b < e) pool.emplace_back(Range, c, s, o, b, e, block_size);
  }
  Range(c, s, o, 0, std::min(n, chunk), block_size);
  for (auto& th : pool) th.join();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxalignNf4Dequantize, Dequantize,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block_size")
                                  .Attr<int64_t>("threads"));
