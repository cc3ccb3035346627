// NF4 dequantization for XLA:CPU, an XLA FFI handler (jaxalign/quant/nf4_cpu.py builds and
// registers it): out[2i] = NF4[codes[i] >> 4] * scale[2i / block_size] and
// out[2i + 1] = NF4[codes[i] & 15] * scale[(2i + 1) / block_size], one fp32 product per element
// (bit for bit what XLA's fused loop and bitsandbytes compute).
//
// With AVX-512 one permute looks up 16 codes in the 16-entry codebook and two more interleave the
// high and low nibbles; a large output whose pages are already mapped is written with
// non-temporal stores (`StreamOutput`). The output is split over `threads` threads in whole
// blocks. Elsewhere a scalar loop.
#include <algorithm>
#include <sys/mman.h>
#include <unistd.h>
#include <functional>
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

// The fp32 scale of each block: absmax itself, or with double quantization
// code_map[absmax_u8[b]] * nested[b / nested_block_size] + offset (two roundings, as bitsandbytes;
// the build uses -ffp-contract=off so the product and the sum are never fused).
struct Scales {
  const float* absmax = nullptr;          // fp32 [nblocks], or
  const uint8_t* absmax_codes = nullptr;  // uint8 [nblocks] with the three below
  const float* code_map = nullptr;        // [256]
  const float* nested = nullptr;          // [ceil(nblocks / nested_block_size)]
  float offset = 0.0f;
  int nested_shift = 0;                   // log2(nested_block_size)
  float operator()(int64_t b) const {
    if (absmax != nullptr) return absmax[b];
    const float product = code_map[absmax_codes[b]] * nested[b >> nested_shift];
    return product + offset;
  }
};

// Elements [begin, end) of the output; begin is a multiple of block_size (a power of two >= 2).
void Range(const uint8_t* codes, const Scales& scale, float* out, int64_t begin, int64_t end,
           int64_t block_size, bool stream) {
  int64_t j = begin;
  int64_t b = begin / block_size;
#if defined(__AVX512F__)
  if (block_size % 32 == 0) {
    const __m512 lut = _mm512_load_ps(kNf4);
    const __m512i lo_idx = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi_idx = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    const __m512i fifteen = _mm512_set1_epi32(15);
    stream = stream && reinterpret_cast<uintptr_t>(out) % 64 == 0;
    // whole blocks: one scale per block, 32 outputs (16 code bytes) per iteration
    for (; j + block_size <= end; j += block_size, ++b) {
      const __m512 s = _mm512_set1_ps(scale(b));
      for (int64_t k = j; k < j + block_size; k += 32) {
        const __m512i w = _mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + k / 2)));
        const __m512 hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(w, 4), lut), s);
        const __m512 lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(w, fifteen), lut), s);
        const __m512 x = _mm512_permutex2var_ps(hi, lo_idx, lo);
        const __m512 y = _mm512_permutex2var_ps(hi, hi_idx, lo);
        if (stream) {  // non-temporal stores: no reading the lines first, no cache pollution
          _mm512_stream_ps(out + k, x);
          _mm512_stream_ps(out + k + 16, y);
        } else {
          _mm512_storeu_ps(out + k, x);
          _mm512_storeu_ps(out + k + 16, y);
        }
      }
    }
    _mm_sfence();
  }
#endif
  for (; j < end; j += block_size, ++b) {  // portable loop; also the last, partial block
    const float s = scale(b);
    const int64_t stop = std::min(end, j + block_size);
    for (int64_t k = j; k < stop; ++k) {
      const uint8_t c = codes[k / 2];
      out[k] = kNf4[(k % 2 == 0) ? (c >> 4) : (c & 15)] * s;
    }
  }
}

bool PowerOfTwo(int64_t x) { return x > 0 && (x & (x - 1)) == 0; }

// Non-temporal stores pay off on a large output whose pages are already mapped (memory reused from
// an earlier buffer); on fresh pages, which the kernel zero-fills into the cache at the first
// write fault, plain stores are faster (measured: RESULTS.md, nf4_ops). mincore() tells which, for
// the page in the middle of the output.
bool StreamOutput(const float* out, int64_t n) {
  if (n * static_cast<int64_t>(sizeof(float)) < (int64_t{8} << 20)) return false;
  const long page = sysconf(_SC_PAGESIZE);
  if (page <= 0) return false;
  const uintptr_t middle = reinterpret_cast<uintptr_t>(out + n / 2) & ~static_cast<uintptr_t>(page - 1);
  unsigned char resident = 0;
  if (mincore(reinterpret_cast<void*>(middle), static_cast<size_t>(page), &resident) != 0) return false;
  return (resident & 1) != 0;
}

ffi::Error Run(const uint8_t* codes, int64_t n_codes, const Scales& scale, int64_t n_scales,
               ffi::ResultBuffer<ffi::F32>& out, int64_t block_size, int64_t threads) {
  const int64_t n = static_cast<int64_t>(out->element_count());
  if (!PowerOfTwo(block_size) || block_size < 2) {
    return ffi::Error::InvalidArgument("block_size must be a power of two >= 2");
  }
  if (n_codes * 2 < n || n_scales * block_size < n) {
    return ffi::Error::InvalidArgument("codes or scales are shorter than the output needs");
  }
  float* o = out->typed_data();
  const bool stream = StreamOutput(o, n);
  int64_t t = std::max<int64_t>(1, threads);
  const int64_t min_per_thread = 1 << 18;
  t = std::min<int64_t>(t, std::max<int64_t>(1, n / min_per_thread));
  if (t == 1) {
    Range(codes, scale, o, 0, n, block_size, stream);
    return ffi::Error::Success();
  }
  const int64_t chunk = ((n / t + block_size - 1) / block_size) * block_size;
  std::vector<std::thread> pool;
  for (int64_t k = 1; k < t; ++k) {
    const int64_t b = std::min(n, k * chunk), e = std::min(n, (k + 1) * chunk);
    if (b < e) pool.emplace_back(Range, codes, std::cref(scale), o, b, e, block_size, stream);
  }
  Range(codes, scale, o, 0, std::min(n, chunk), block_size, stream);
  for (auto& th : pool) th.join();
  return ffi::Error::Success();
}

// absmax given as fp32 block scales (single quantization, or scales computed by the caller)
ffi::Error Dequantize(ffi::Buffer<ffi::U8> codes, ffi::Buffer<ffi::F32> absmax,
                      ffi::ResultBuffer<ffi::F32> out, int64_t block_size, int64_t threads) {
  Scales scale;
  scale.absmax = absmax.typed_data();
  return Run(codes.typed_data(), static_cast<int64_t>(codes.element_count()), scale,
             static_cast<int64_t>(absmax.element_count()), out, block_size, threads);
}

// double quantization: the block scales are decoded on the fly, block by block
ffi::Error DequantizeDouble(ffi::Buffer<ffi::U8> codes, ffi::Buffer<ffi::U8> absmax,
                            ffi::Buffer<ffi::F32> code_map, ffi::Buffer<ffi::F32> nested,
                            ffi::Buffer<ffi::F32> offset, ffi::ResultBuffer<ffi::F32> out,
                            int64_t block_size, int64_t nested_block_size, int64_t threads) {
  const int64_t nb = static_cast<int64_t>(absmax.element_count());
  if (!PowerOfTwo(nested_block_size)) {
    return ffi::Error::InvalidArgument("nested_block_size must be a power of two");
  }
  if (code_map.element_count() != 256 || offset.element_count() != 1 ||
      static_cast<int64_t>(nested.element_count()) * nested_block_size < nb) {
    return ffi::Error::InvalidArgument("code_map must hold 256 values, offset 1, and nested one "
                                       "scale per nested block");
  }
  Scales scale;
  scale.absmax_codes = absmax.typed_data();
  scale.code_map = code_map.typed_data();
  scale.nested = nested.typed_data();
  scale.offset = offset.typed_data()[0];
  scale.nested_shift = __builtin_ctzll(static_cast<unsigned long long>(nested_block_size));
  return Run(codes.typed_data(), static_cast<int64_t>(codes.element_count()), scale, nb, out,
             block_size, threads);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxalignNf4Dequantize, Dequantize,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block_size")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxalignNf4DequantizeDouble, DequantizeDouble,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block_size")
                                  .Attr<int64_t>("nested_block_size")
                                  .Attr<int64_t>("threads"));
