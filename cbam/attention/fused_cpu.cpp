// The channel and spatial gates of cbam.attention.ChannelSpatialAttention, forward and backward, fused per
// sample for the CPU (the module's composite PyTorch path is the reference; tests/test_attention.py holds
// both to a float64 reference of the post's formulas).
//
// Why per sample: a sample's activation (C x H x W) fits in the core's cache, so every pass the gates make
// over it (two poolings, the products, their backward) runs there, and memory sees one read of x and one
// write of the output (forward), two reads and one write (backward). Op by op, each pass goes to memory.
// Only gates without BatchNorm can run this way: BN's statistics span the batch (those use the composite path).
//
// Built at first use by cbam/attention/fused.py (g++ -O3 -fopenmp), loaded with ctypes. OpenMP is the
// runtime torch already loaded (same soname), so the threads are torch's.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#include <omp.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

enum Arrangement { CHANNEL_SPATIAL = 0, SPATIAL_CHANNEL = 1, PARALLEL = 2, CHANNEL_ONLY = 3, SPATIAL_ONLY = 4 };
enum Pool { AVG = 0, MAX = 1 };
enum Dtype { F32 = 0, F64 = 1, BF16 = 2 };

struct Spec {
  int arrangement;
  int n_cpools, cpools[2];
  int shared_mlp, hidden, mlp_bias;
  int n_spools, spools[2];
  int kernel, residual;
  int N, C, H, W, channels_last;
  int R;  // the row stride of a sample's channel-major values (with_row_stride)
  bool channel() const { return arrangement != SPATIAL_ONLY; }
  bool spatial() const { return arrangement != CHANNEL_ONLY; }
  int n_mlps() const { return channel() ? (shared_mlp ? 1 : n_cpools) : 0; }
  int P() const { return H * W; }
  int cpool_index(int kind) const {
    for (int k = 0; k < n_cpools; ++k) if (cpools[k] == kind) return k;
    return -1;
  }
  int spool_index(int kind) const {
    for (int k = 0; k < n_spools; ++k) if (spools[k] == kind) return k;
    return -1;
  }
  // Per-sample saved values: Mc[C] | Ms[P] | channel pools [n_cp][C] | hidden pre-activations [n_cp][h] |
  // spatial maps [n_sp][P]; the channel max's argmax is saved apart, as int32 [C].
  long saved_size() const {
    long s = 0;
    if (channel()) s += C + (long)n_cpools * C + (long)n_cpools * hidden;
    if (spatial()) s += P() + (long)n_spools * P();
    return s;
  }
};

Spec read_spec(const int32_t* s, int N, int C, int H, int W, int channels_last) {
  Spec p;
  p.arrangement = s[0];
  p.n_cpools = s[1]; p.cpools[0] = s[2]; p.cpools[1] = s[3];
  p.shared_mlp = s[4]; p.hidden = s[5]; p.mlp_bias = s[6];
  p.n_spools = s[7]; p.spools[0] = s[8]; p.spools[1] = s[9];
  p.kernel = s[10]; p.residual = s[11];
  p.N = N; p.C = C; p.H = H; p.W = W; p.channels_last = channels_last;
  p.R = H * W;
  return p;
}

// ---- element types: computed in Acc (float, or double for float64 tensors), stored as T

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = (uint32_t)v << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does; NaN stays NaN (branch-free)
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  uint32_t quiet = (bits >> 16) | 0x40u;
  return (uint16_t)((bits & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
}

template <typename T, typename Acc> struct Elem {
  static inline Acc load(const T* p, long i) { return (Acc)p[i]; }
  static inline void store(T* p, long i, Acc v) { p[i] = (T)v; }
};
template <> struct Elem<uint16_t, float> {
  static inline float load(const uint16_t* p, long i) { return bf16_to_float(p[i]); }
  static inline void store(uint16_t* p, long i, float v) { p[i] = float_to_bf16(v); }
};

// torch.relu's values: NaN stays NaN, and -0 becomes +0 (its max(v, 0) returns the second operand of a tie).
template <typename V> inline V relu(V v) { return v > 0 || v != v ? v : V{}; }

// ---- channels_last samples in blocks of BLOCK positions x BLOCK channels, transposed in registers and
// converted in the same pass: element by element, these transposes were a third of the op's time in bf16.
// AVX-512: 16 x 16 blocks; AVX2 (no AVX-512): 8 x 8 blocks. Only data moves: the same bits either way.
#if defined(__AVX512F__)
#define CBAM_BLOCK_TRANSPOSE 1
constexpr int BLOCK = 16;
typedef __m512 block_row;

inline __m512 load_row(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_row(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline void store_row(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store_row(uint16_t* p, __m512 v) {  // float_to_bf16, sixteen at a time
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), odd), 16);
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet)));
}

// r[i] holds row i of a 16 x 16 block; afterwards r[j] holds its column j.
inline void transpose_block(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}
#elif defined(__AVX2__)
#define CBAM_BLOCK_TRANSPOSE 1
constexpr int BLOCK = 8;
typedef __m256 block_row;

inline __m256 load_row(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load_row(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline void store_row(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store_row(uint16_t* p, __m256 v) {  // float_to_bf16, eight at a time
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), odd), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
  // Both sides below 2^31, so the signed comparison is the unsigned one.
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff)),
                                         _mm256_set1_epi32(0x7f800000));
  const __m256i halves = _mm256_blendv_epi8(rounded, quiet, nan);  // each lane below 2^16: packing keeps it
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(halves, halves), 0xd8);
  _mm_storeu_si128((__m128i*)p, _mm256_castsi256_si128(packed));
}

// r[i] holds row i of an 8 x 8 block; afterwards r[j] holds its column j.
inline void transpose_block(__m256* r) {
  __m256 t[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    r[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
    t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
  }
  for (int i = 0; i < 8; ++i) r[i] = t[i];
}
#endif

// A sample's tensor in its memory layout, as a canonical channel-major buffer in Acc (C rows of P values,
// s.R apart) and back.
template <typename T, typename Acc>
void load_sample(const T* src, Acc* dst, const Spec& s) {
  const int C = s.C, P = s.P();
  if (!s.channels_last) {
    for (int c = 0; c < C; ++c)
      for (int p = 0; p < P; ++p) dst[(long)c * s.R + p] = Elem<T, Acc>::load(src, (long)c * P + p);
    return;
  }
  int p0 = 0;
#if defined(CBAM_BLOCK_TRANSPOSE)
  if constexpr (std::is_same<Acc, float>::value)  // float or bf16 tensors; the rest position by position
    if (C % BLOCK == 0)
      for (; p0 + BLOCK <= P; p0 += BLOCK)
        for (int c0 = 0; c0 < C; c0 += BLOCK) {
          block_row r[BLOCK];
          for (int i = 0; i < BLOCK; ++i) r[i] = load_row(src + (long)(p0 + i) * C + c0);
          transpose_block(r);
          for (int j = 0; j < BLOCK; ++j) store_row(dst + (long)(c0 + j) * s.R + p0, r[j]);
        }
#endif
  for (int p = p0; p < P; ++p)
    for (int c = 0; c < C; ++c) dst[(long)c * s.R + p] = Elem<T, Acc>::load(src, (long)p * C + c);
}

template <typename T, typename Acc>
void store_sample(const Acc* src, T* dst, const Spec& s) {
  const int C = s.C, P = s.P();
  if (!s.channels_last) {
    for (int c = 0; c < C; ++c)
      for (int p = 0; p < P; ++p) Elem<T, Acc>::store(dst, (long)c * P + p, src[(long)c * s.R + p]);
    return;
  }
  int p0 = 0;
#if defined(CBAM_BLOCK_TRANSPOSE)
  if constexpr (std::is_same<Acc, float>::value)  // float or bf16 tensors; the rest position by position
    if (C % BLOCK == 0)
      for (; p0 + BLOCK <= P; p0 += BLOCK)
        for (int c0 = 0; c0 < C; c0 += BLOCK) {
          block_row r[BLOCK];
          for (int j = 0; j < BLOCK; ++j) r[j] = load_row(src + (long)(c0 + j) * s.R + p0);
          transpose_block(r);
          for (int i = 0; i < BLOCK; ++i) store_row(dst + (long)(p0 + i) * C + c0, r[i]);
        }
#endif
  for (int p = p0; p < P; ++p)
    for (int c = 0; c < C; ++c) Elem<T, Acc>::store(dst, (long)p * C + c, src[(long)c * s.R + p]);
}

template <typename Acc> inline Acc sigmoid(Acc v) { return Acc(1) / (Acc(1) + std::exp(-v)); }

// ---- reductions over a row, in GCC's vector extensions: auto-vectorized, these reductions went through the
// stack or stayed scalar and cost more than the passes over the row themselves. The vectors are as wide as
// the CPU's registers (AVX-512, AVX, else 16 bytes: SSE, NEON): wider ones (64 bytes on AVX2) are lowered
// through the stack, which made the whole op 2-3x slower there. The width sets how many partial sums a
// reduction keeps, so its rounding (not its arithmetic) differs between AVX-512 and AVX2 builds, as oneDNN's does.
#if defined(__AVX512F__)
constexpr int VEC_BYTES = 64;
#elif defined(__AVX__)
constexpr int VEC_BYTES = 32;
#else
constexpr int VEC_BYTES = 16;
#endif
template <typename Acc> struct Vec { typedef Acc type __attribute__((vector_size(VEC_BYTES))); };
template <typename Acc> using vec_t = typename Vec<Acc>::type;
template <typename Acc> constexpr int LANES = VEC_BYTES / sizeof(Acc);
constexpr long SLACK = 256;  // room past the conv's planes for its last block of four vectors

template <typename Acc> inline vec_t<Acc> load_vec(const Acc* p) {
  vec_t<Acc> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The lanes of acc, then the elements from i on: how sum_of and taps_of finish.
template <typename Acc>
inline Acc finish_sum(vec_t<Acc> acc, const Acc* a, const Acc* b, int i, int n, const Acc* c = nullptr) {
  Acc sum = 0;
  for (int l = 0; l < LANES<Acc>; ++l) sum += acc[l];
  for (; i < n; ++i) sum += a[i] * (b ? b[i] : Acc(1)) * (c ? c[i] : Acc(1));
  return sum;
}

// sum_i a[i] * (b ? b[i] : 1) * (c ? c[i] : 1)
template <typename Acc>
inline Acc sum_of(const Acc* a, const Acc* b, int n, const Acc* c = nullptr) {
  constexpr int L = LANES<Acc>;
  vec_t<Acc> acc = {};
  int i = 0;
  if (b && c) for (; i + L <= n; i += L) acc += load_vec(a + i) * (load_vec(b + i) * load_vec(c + i));
  else if (b) for (; i + L <= n; i += L) acc += load_vec(a + i) * load_vec(b + i);
  else for (; i + L <= n; i += L) acc += load_vec(a + i);
  return finish_sum(acc, a, b, i, n, c);
}

// out[j] += sum_of(a + j, b, n) for j in [0, G): G sums at once, each in sum_of's order. One sum at a
// time, each addition waits on the one before it.
template <int G, typename Acc>
inline void shifted_sums(const Acc* a, const Acc* b, int n, Acc* out) {
  constexpr int L = LANES<Acc>;
  vec_t<Acc> acc[G] = {};
  int i = 0;
  for (; i + L <= n; i += L) {
    const vec_t<Acc> bv = load_vec(b + i);
#pragma GCC unroll 8
    for (int j = 0; j < G; ++j) acc[j] += load_vec(a + j + i) * bv;
  }
  for (int j = 0; j < G; ++j) out[j] += finish_sum(acc[j], a + j, b, i, n);
}

// out[j] += sum_of(a + j, b, n) for j in [0, k): the taps of one kernel row.
template <typename Acc>
inline void taps_of(const Acc* a, const Acc* b, int n, int k, Acc* out) {
  int j = 0;
  for (; j + 4 <= k; j += 4) shifted_sums<4>(a + j, b, n, out + j);
  switch (k - j) {
    case 3: shifted_sums<3>(a + j, b, n, out + j); break;
    case 2: shifted_sums<2>(a + j, b, n, out + j); break;
    case 1: shifted_sums<1>(a + j, b, n, out + j); break;
  }
}

// A row's lanes reduced: the sum in lane order (sum += total[l]), the maximum and the first position holding
// it (the smallest at[l] among the lanes at the maximum; lanes never hold NaN, which loses every comparison).
template <typename Acc>
inline void finish_sum_max(const vec_t<Acc>& total, const vec_t<Acc>& best, const vec_t<Acc>& at, Acc* sum,
                           Acc* peak, int* first) {
  Acc s = 0;
  for (int l = 0; l < LANES<Acc>; ++l) s += total[l];
  *sum = s;
#if defined(__AVX512F__)
  if constexpr (std::is_same<Acc, float>::value) {  // lane by lane, this was most of a short row's time
    const __m512 b = best;
    const float m = _mm512_reduce_max_ps(b);
    *peak = m;
    *first = (int)_mm512_mask_reduce_min_ps(_mm512_cmp_ps_mask(b, _mm512_set1_ps(m), _CMP_EQ_OQ), at);
    return;
  }
#endif
  Acc m = -std::numeric_limits<Acc>::infinity();
  int f = std::numeric_limits<int>::max();
  for (int l = 0; l < LANES<Acc>; ++l) {
    if (best[l] > m) { m = best[l]; f = (int)at[l]; }
    else if (best[l] == m && (int)at[l] < f) f = (int)at[l];
  }
  *peak = m;
  *first = f;
}

// One pass over z = a[i] * (b ? b[i] : 1): its sum, its maximum and the first i that holds it (what
// adaptive_max_pool2d's backward gives the gradient to).
template <typename Acc>
inline void row_sum_max(const Acc* a, const Acc* b, int n, Acc* sum, Acc* peak, int32_t* first) {
  constexpr int L = LANES<Acc>;
  vec_t<Acc> total = {}, best, at = {}, pos;
  for (int l = 0; l < L; ++l) { best[l] = -std::numeric_limits<Acc>::infinity(); pos[l] = Acc(l); }
  int i = 0;
  for (; i + L <= n; i += L, pos += Acc(L)) {
    vec_t<Acc> z = b ? load_vec(a + i) * load_vec(b + i) : load_vec(a + i);
    total += z;
    auto more = z > best;  // strict: each lane keeps its first maximum
    best = more ? z : best;
    at = more ? pos : at;
  }
  Acc s, m;
  int f;
  finish_sum_max(total, best, at, &s, &m, &f);
  for (; i < n; ++i) {
    Acc z = b ? a[i] * b[i] : a[i];
    s += z;
    if (z > m) { m = z; f = i; }
  }
  *sum = s;
  *peak = m;
  *first = f < n ? f : 0;  // all NaN: nothing compares, position 0 as adaptive_max_pool2d
}

// v[i] = sigmoid(v[i]); for float a vectorizable exp (2^x: exponent bits plus a degree-6 polynomial of the
// fraction, relative error below 3e-7), where std::exp is a call per element.
template <typename Acc>
inline void sigmoid_all(Acc* v, int n) {
  for (int i = 0; i < n; ++i) v[i] = sigmoid(v[i]);
}

template <>
inline void sigmoid_all<float>(float* v, int n) {
  for (int i = 0; i < n; ++i) {
    float x = -v[i];
    x = x > 88.0f ? 88.0f : (x < -88.0f ? -88.0f : x);
    float t = x * 1.44269504088896341f;  // log2(e)
    float k = std::nearbyint(t);
    float f = t - k;  // in [-0.5, 0.5]
    float poly = 1.53533080e-4f;
    poly = poly * f + 1.33997766e-3f;
    poly = poly * f + 9.61817801e-3f;
    poly = poly * f + 5.55041086e-2f;
    poly = poly * f + 2.40226507e-1f;
    poly = poly * f + 6.93147182e-1f;
    poly = poly * f + 1.0f;
    int32_t bits;
    std::memcpy(&bits, &poly, 4);
    bits += (int32_t)k << 23;
    float e;
    std::memcpy(&e, &bits, 4);
    v[i] = 1.0f / (1.0f + e);
  }
}

// ---- parameters, in the order fused.py passes them: per MLP w1 (h, C), [b1 (h)], w2 (C, h), [b2 (C)];
// then the spatial conv's weight (1, n_sp, k, k).

template <typename Acc> struct Params {
  std::vector<Acc*> w1, b1, w2, b2;
  Acc* conv = nullptr;
  Params(Acc** ptrs, const Spec& s) {
    int i = 0;
    for (int m = 0; m < s.n_mlps(); ++m) {
      w1.push_back(ptrs[i++]);
      b1.push_back(s.mlp_bias ? ptrs[i++] : nullptr);
      w2.push_back(ptrs[i++]);
      b2.push_back(s.mlp_bias ? ptrs[i++] : nullptr);
    }
    if (s.spatial()) conv = ptrs[i++];
  }
};

// Sizes of the parameters, in the same order (for the per-thread gradient buffers).
std::vector<long> param_sizes(const Spec& s) {
  std::vector<long> sizes;
  for (int m = 0; m < s.n_mlps(); ++m) {
    sizes.push_back((long)s.hidden * s.C);
    if (s.mlp_bias) sizes.push_back(s.hidden);
    sizes.push_back((long)s.C * s.hidden);
    if (s.mlp_bias) sizes.push_back(s.C);
  }
  if (s.spatial()) sizes.push_back((long)s.n_spools * s.kernel * s.kernel);
  return sizes;
}

// Where a sample's saved values live.
template <typename Acc> struct Saved {
  Acc *mc = nullptr, *ms = nullptr, *cpool = nullptr, *hpre = nullptr, *smaps = nullptr;
  int32_t* argmax;
  Saved(Acc* base, int32_t* argmax_, const Spec& s) : argmax(argmax_) {
    Acc* p = base;
    if (s.channel()) {
      mc = p; p += s.C;
      cpool = p; p += (long)s.n_cpools * s.C;
      hpre = p; p += (long)s.n_cpools * s.hidden;
    }
    if (s.spatial()) {
      ms = p; p += s.P();
      smaps = p;
    }
  }
};

// Memory on 64-byte lines: rows of 16 floats then start on a cache line wherever the row length allows (the
// NHWC blocks store whole rows of 16, and a store across two lines costs two).
template <typename T> struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <typename U> LineAligned(const LineAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U> bool operator==(const LineAligned<U>&) const { return true; }
};

// Per-thread scratch, kept between calls (grown, never shrunk): allocating it per call cost page faults.
template <typename Acc> struct Scratch {
  std::vector<Acc, LineAligned<Acc>> x, g, d, padded, dpadded, wide, flipped, vec_c, vec_p, vec_p2, dmaps, dv, logit,
      hidden;
  std::vector<int> ties;
  static Scratch& for_this_thread(const Spec& s) {
    static thread_local Scratch t;
    long CP = (long)s.C * s.R;
    int r = s.kernel / 2;
    long pad = (long)(s.H + 2 * r) * (s.W + 2 * r);
    for (auto* v : {&t.x, &t.g, &t.d}) v->resize(CP);
    t.padded.assign(pad * 2 + SLACK, Acc(0));  // zero: the conv's last block reads past the planes
    t.dpadded.resize(pad + SLACK); t.wide.resize(pad + SLACK);
    t.flipped.resize((long)s.kernel * s.kernel);
    t.vec_c.resize(s.C); t.vec_p.resize(s.P()); t.vec_p2.resize(s.P());
    t.dmaps.resize((long)2 * s.P()); t.dv.resize((long)2 * s.C); t.logit.resize(s.C > s.P() ? s.C : s.P());
    t.hidden.resize(s.hidden);
    t.ties.resize(s.P());
    return t;
  }
};

// ---- channel gate: Mc = sigmoid(sum_k MLP_k(pool_k over P of z)), z = x * scale_p (or x)

// Both pools of row c from its sum and maximum.
template <typename Acc>
inline void set_channel_pools(int c, Acc sum, Acc peak, Saved<Acc>& sv, const Spec& s) {
  for (int k = 0; k < s.n_cpools; ++k) sv.cpool[(long)k * s.C + c] = s.cpools[k] == AVG ? sum / Acc(s.P()) : peak;
}

template <typename Acc>
void channel_pools(const Acc* x, const Acc* scale_p, Saved<Acc>& sv, const Spec& s) {
  const int C = s.C, P = s.P();
  for (int c = 0; c < C; ++c) {
    Acc sum, peak;
    row_sum_max(x + (long)c * s.R, scale_p, P, &sum, &peak, sv.argmax + c);
    set_channel_pools(c, sum, peak, sv, s);
  }
}

// The pools (sv.cpool) through the MLPs: Mc, and the hidden pre-activations backward needs.
template <typename Acc>
void channel_mlp(const Params<Acc>& w, Saved<Acc>& sv, Scratch<Acc>& t, const Spec& s) {
  const int C = s.C, h = s.hidden;
  Acc* logit = t.logit.data();
  for (int c = 0; c < C; ++c) logit[c] = 0;
  for (int k = 0; k < s.n_cpools; ++k) {
    int m = s.shared_mlp ? 0 : k;
    const Acc* pool = sv.cpool + (long)k * C;
    Acc* pre = sv.hpre + (long)k * h;
    for (int j = 0; j < h; ++j) {
      Acc a = w.b1[m] ? w.b1[m][j] : Acc(0);
      pre[j] = a + sum_of(w.w1[m] + (long)j * C, pool, C);
    }
    Acc* relu = t.hidden.data();
    for (int j = 0; j < h; ++j) relu[j] = pre[j] > 0 ? pre[j] : Acc(0);
    for (int c = 0; c < C; ++c) logit[c] += (w.b2[m] ? w.b2[m][c] : Acc(0)) + sum_of(w.w2[m] + (long)c * h, relu, h);
  }
  for (int c = 0; c < C; ++c) sv.mc[c] = logit[c];
  sigmoid_all(sv.mc, C);
}

// d(loss)/d(Mc) -> the MLPs' parameter gradients (added to grads) and d(loss)/d(pool_k), in t.dv [n_cp][C].
template <typename Acc>
void channel_backward_mlp(const Acc* d_mc, const Params<Acc>& w, const Saved<Acc>& sv, Params<Acc>& grads,
                          Scratch<Acc>& t, const Spec& s) {
  const int C = s.C, h = s.hidden;
  Acc* dlogit = t.logit.data();
  for (int c = 0; c < C; ++c) dlogit[c] = d_mc[c] * sv.mc[c] * (Acc(1) - sv.mc[c]);
  for (int k = 0; k < s.n_cpools; ++k) {
    int m = s.shared_mlp ? 0 : k;
    const Acc* pool = sv.cpool + (long)k * C;
    const Acc* pre = sv.hpre + (long)k * h;
    Acc* dpool = t.dv.data() + (long)k * C;
    if (grads.b2[m]) for (int c = 0; c < C; ++c) grads.b2[m][c] += dlogit[c];
    for (int c = 0; c < C; ++c) dpool[c] = 0;
    // Row by row of w2 (C, h): contiguous, so it vectorises over j, where a column walk read a cache line
    // per element. Each dh[j] still sums over c in order, but the compiler fuses its multiply-adds
    // differently in the two loops: the last bits moved with this change.
    Acc* dh = t.hidden.data();
    for (int j = 0; j < h; ++j) dh[j] = 0;
    for (int c = 0; c < C; ++c) {
      const Acc dl = dlogit[c];
      const Acc* wr = w.w2[m] + (long)c * h;
      Acc* gr = grads.w2[m] + (long)c * h;
      for (int j = 0; j < h; ++j) {
        gr[j] += dl * (pre[j] > 0 ? pre[j] : Acc(0));
        dh[j] += wr[j] * dl;
      }
    }
    for (int j = 0; j < h; ++j) {
      Acc dpre = pre[j] > 0 ? dh[j] : Acc(0);
      if (grads.b1[m]) grads.b1[m][j] += dpre;
      const Acc* wr = w.w1[m] + (long)j * C;
      Acc* gr = grads.w1[m] + (long)j * C;
      for (int c = 0; c < C; ++c) {
        gr[c] += dpre * pool[c];
        dpool[c] += wr[c] * dpre;
      }
    }
  }
}

// d(pool_k) (t.dv) -> d(z) added into dz [C][P] (z = x * scale_p, so each term is also scaled when
// `scale_p` is given: the caller passes the z-gradient's destination and handles the product rule).
template <typename Acc>
void channel_backward_pools(Acc* dz, const Saved<Acc>& sv, Scratch<Acc>& t, const Spec& s) {
  const int C = s.C, P = s.P();
  const Acc inv_p = Acc(1) / Acc(P);
  for (int k = 0; k < s.n_cpools; ++k) {
    const Acc* dpool = t.dv.data() + (long)k * C;
    for (int c = 0; c < C; ++c) {
      Acc* row = dz + (long)c * s.R;
      if (s.cpools[k] == AVG) {
        Acc v = dpool[c] * inv_p;
        for (int p = 0; p < P; ++p) row[p] += v;
      } else {
        row[sv.argmax[c]] += dpool[c];  // the first maximum, as adaptive_max_pool2d's backward
      }
    }
  }
}

// out[e] = sum_{q, i, j} w[q][i][j] * in[q * in_stride + e + i * PW + j] for e in [0, span): the k x k
// correlation of nq padded planes (rows of PW), on the padded width. Four vectors of outputs stay in
// registers through all taps; `in` and `out` have SLACK elements of room past their ends for the last block.

template <typename Acc>
void correlate(const Acc* in, long in_stride, int nq, const Acc* w, int k, int PW, long span, Acc* out) {
  constexpr int L = LANES<Acc>;
  for (long e0 = 0; e0 < span; e0 += 4 * L) {
    vec_t<Acc> a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int q = 0; q < nq; ++q)
      for (int i = 0; i < k; ++i)
        for (int j = 0; j < k; ++j) {
          const Acc wt = w[((long)q * k + i) * k + j];
          const Acc* src = in + q * in_stride + e0 + (long)i * PW + j;
          a0 += wt * load_vec(src);
          a1 += wt * load_vec(src + L);
          a2 += wt * load_vec(src + 2 * L);
          a3 += wt * load_vec(src + 3 * L);
        }
    std::memcpy(out + e0, &a0, sizeof a0);
    std::memcpy(out + e0 + L, &a1, sizeof a1);
    std::memcpy(out + e0 + 2 * L, &a2, sizeof a2);
    std::memcpy(out + e0 + 3 * L, &a3, sizeof a3);
  }
}

// The saved maps, zero-padded by r on every side, into t.padded [n_sp][PH][PW].
template <typename Acc>
void pad_maps(const Saved<Acc>& sv, Scratch<Acc>& t, const Spec& s) {
  const int P = s.P(), H = s.H, W = s.W, r = s.kernel / 2, PW = W + 2 * r, PH = H + 2 * r;
  Acc* pad = t.padded.data();
  std::fill(pad, pad + (long)s.n_spools * PH * PW, Acc(0));
  for (int q = 0; q < s.n_spools; ++q)
    for (int y = 0; y < H; ++y)
      std::memcpy(pad + (long)q * PH * PW + (long)(y + r) * PW + r, sv.smaps + (long)q * P + (long)y * W,
                  sizeof(Acc) * W);
}

// ---- spatial gate: Ms = sigmoid(conv([pool_k over C of z]) [+ mean_k pool_k]), z = x * scale_c (or x)

// The maps of every requested pool, from the sums and maxima over the channels.
template <typename Acc>
void set_spatial_maps(const Acc* sum, const Acc* peak, Saved<Acc>& sv, const Spec& s) {
  const int P = s.P();
  const Acc inv_c = Acc(1) / Acc(s.C);
  for (int q = 0; q < s.n_spools; ++q) {
    Acc* map = sv.smaps + (long)q * P;
    if (s.spools[q] == AVG) for (int p = 0; p < P; ++p) map[p] = sum[p] * inv_c;
    else std::memcpy(map, peak, sizeof(Acc) * P);
  }
}

// Both maps of z = x * scale_c (or x) in one pass: the mean and the maximum over the channels.
template <typename Acc>
void spatial_pools(const Acc* x, const Acc* scale_c, Saved<Acc>& sv, Scratch<Acc>& t, const Spec& s) {
  const int C = s.C, P = s.P();
  Acc* sum = t.vec_p.data();
  Acc* peak = t.vec_p2.data();
  for (int p = 0; p < P; ++p) { sum[p] = 0; peak[p] = -std::numeric_limits<Acc>::infinity(); }
  for (int c = 0; c < C; ++c) {
    const Acc* row = x + (long)c * s.R;
    const Acc sc = scale_c ? scale_c[c] : Acc(1);
    for (int p = 0; p < P; ++p) {
      Acc z = scale_c ? row[p] * sc : row[p];
      sum[p] += z;
      peak[p] = z > peak[p] ? z : peak[p];
    }
  }
  set_spatial_maps(sum, peak, sv, s);
}

// The maps (sv.smaps) through the conv: Ms.
template <typename Acc>
void spatial_conv(const Params<Acc>& w, Saved<Acc>& sv, Scratch<Acc>& t, const Spec& s) {
  const int P = s.P(), H = s.H, W = s.W, k = s.kernel, r = k / 2;
  const int PW = W + 2 * r, PH = H + 2 * r;
  // conv, zero padding r: logit[h][w] = sum_q sum_ij w[q][i][j] * map_q[h + i - r][w + j - r]. Computed on
  // the padded width (rows of PW, the last 2r columns discarded), so each tap is one long contiguous loop.
  pad_maps(sv, t, s);
  const Acc* pad = t.padded.data();
  const long span = (long)(H - 1) * PW + W;  // the wide plane up to the last valid output
  Acc* wide = t.wide.data();
  correlate(pad, (long)PH * PW, s.n_spools, w.conv, k, PW, span, wide);
  Acc* logit = t.logit.data();
  for (int y = 0; y < H; ++y) std::memcpy(logit + (long)y * W, wide + (long)y * PW, sizeof(Acc) * W);
  if (s.residual) {  // improvement 2's shortcut: the mean of the pooled maps bypasses the conv
    Acc inv = Acc(1) / Acc(s.n_spools);
    for (int p = 0; p < P; ++p) {
      Acc m = 0;
      for (int q = 0; q < s.n_spools; ++q) m += sv.smaps[(long)q * P + p];
      logit[p] += m * inv;
    }
  }
  for (int p = 0; p < P; ++p) sv.ms[p] = logit[p];
  sigmoid_all(sv.ms, P);
}

// d(loss)/d(Ms) -> the conv weight's gradient (added to grads) and d(loss)/d(map_q), in t.dmaps [n_sp][P].
template <typename Acc>
void spatial_backward_conv(const Acc* d_ms, const Params<Acc>& w, const Saved<Acc>& sv, Params<Acc>& grads,
                           Scratch<Acc>& t, const Spec& s) {
  const int P = s.P(), H = s.H, W = s.W, k = s.kernel, r = k / 2;
  const int PW = W + 2 * r, PH = H + 2 * r;
  Acc* dlogit = t.logit.data();
  for (int p = 0; p < P; ++p) dlogit[p] = d_ms[p] * sv.ms[p] * (Acc(1) - sv.ms[p]);
  // Weights: gw[q][i][j] = sum over outputs of map_q[y + i - r][x + j - r] * dlogit[y][x], on the padded
  // width (dlogit in rows of PW, zero in the discarded columns).
  const long span = (long)(H - 1) * PW + W;
  Acc* wide = t.wide.data();
  std::fill(wide, wide + span + SLACK, Acc(0));
  for (int y = 0; y < H; ++y) std::memcpy(wide + (long)y * PW, dlogit + (long)y * W, sizeof(Acc) * W);
  const Acc* pad = t.padded.data();  // the padded maps (pad_maps)
  for (int q = 0; q < s.n_spools; ++q)
    for (int i = 0; i < k; ++i)
      taps_of(pad + (long)q * PH * PW + (long)i * PW, (const Acc*)wide, (int)span, k, grads.conv + ((long)q * k + i) * k);
  // Maps: the correlation of dlogit, zero-padded by r, with the flipped kernel of each map.
  Acc* dpad = t.dpadded.data();
  std::fill(dpad, dpad + (long)PH * PW + SLACK, Acc(0));
  for (int y = 0; y < H; ++y) std::memcpy(dpad + (long)(y + r) * PW + r, dlogit + (long)y * W, sizeof(Acc) * W);
  Acc* flipped = t.flipped.data();
  Acc inv = Acc(1) / Acc(s.n_spools);
  for (int q = 0; q < s.n_spools; ++q) {
    for (int i = 0; i < k; ++i)
      for (int j = 0; j < k; ++j) flipped[(long)i * k + j] = w.conv[((long)q * k + (k - 1 - i)) * k + (k - 1 - j)];
    correlate(dpad, 0, 1, flipped, k, PW, span, wide);
    Acc* dmap = t.dmaps.data() + (long)q * P;
    for (int y = 0; y < H; ++y) std::memcpy(dmap + (long)y * W, wide + (long)y * PW, sizeof(Acc) * W);
    if (s.residual) for (int p = 0; p < P; ++p) dmap[p] += dlogit[p] * inv;
  }
}

// d(map_q) (t.dmaps) -> d(z) added into dz [C][P], z = x * scale_c (or x). The max over channels gives its
// gradient to every tied maximum in equal parts, as amax's backward.
template <typename Acc>
void spatial_backward_pools(Acc* dz, const Acc* x, const Acc* scale_c, const Saved<Acc>& sv, Scratch<Acc>& t,
                            const Spec& s) {
  const int C = s.C, P = s.P();
  const Acc inv_c = Acc(1) / Acc(C);
  for (int q = 0; q < s.n_spools; ++q) {
    const Acc* dmap = t.dmaps.data() + (long)q * P;
    if (s.spools[q] == AVG) {
      for (int c = 0; c < C; ++c) {
        Acc* row = dz + (long)c * s.R;
        for (int p = 0; p < P; ++p) row[p] += dmap[p] * inv_c;
      }
    } else {
      const Acc* peak = sv.smaps + (long)q * P;
      int* ties = t.ties.data();
      for (int p = 0; p < P; ++p) ties[p] = 0;
      for (int c = 0; c < C; ++c) {
        const Acc* row = x + (long)c * s.R;
        Acc sc = scale_c ? scale_c[c] : Acc(1);
        for (int p = 0; p < P; ++p) {
          Acc z = scale_c ? row[p] * sc : row[p];
          ties[p] += z == peak[p];
        }
      }
      Acc* share = t.vec_p2.data();
      for (int p = 0; p < P; ++p) share[p] = ties[p] ? dmap[p] / Acc(ties[p]) : Acc(0);
      for (int c = 0; c < C; ++c) {
        const Acc* row = x + (long)c * s.R;
        Acc* drow = dz + (long)c * s.R;
        Acc sc = scale_c ? scale_c[c] : Acc(1);
        for (int p = 0; p < P; ++p) {
          Acc z = scale_c ? row[p] * sc : row[p];
          if (z == peak[p]) drow[p] += share[p];
        }
      }
    }
  }
}

// ---- the whole gate, one sample

// Every gate's pools of x itself (parallel arrangement, or one gate), in one pass over it.
template <typename Acc>
void pools_of_x(const Acc* x, Saved<Acc>& sv, Scratch<Acc>& t, const Spec& s) {
  if (!s.spatial()) return channel_pools(x, (const Acc*)nullptr, sv, s);
  if (!s.channel()) return spatial_pools(x, (const Acc*)nullptr, sv, t, s);
  constexpr int L = LANES<Acc>;
  const int C = s.C, P = s.P();
  Acc* colsum = t.vec_p.data();
  Acc* colmax = t.vec_p2.data();
  for (int p = 0; p < P; ++p) { colsum[p] = 0; colmax[p] = -std::numeric_limits<Acc>::infinity(); }
  for (int c = 0; c < C; ++c) {
    const Acc* row = x + (long)c * s.R;
    vec_t<Acc> total = {}, best, at = {}, pos;
    for (int l = 0; l < L; ++l) { best[l] = -std::numeric_limits<Acc>::infinity(); pos[l] = Acc(l); }
    int i = 0;
    for (; i + L <= P; i += L, pos += Acc(L)) {
      vec_t<Acc> v = load_vec(row + i), cs = load_vec(colsum + i), cm = load_vec(colmax + i);
      total += v;
      auto more = v > best;
      best = more ? v : best;
      at = more ? pos : at;
      cs += v;
      cm = v > cm ? v : cm;
      std::memcpy(colsum + i, &cs, sizeof cs);
      std::memcpy(colmax + i, &cm, sizeof cm);
    }
    Acc sum, peak;
    int first;
    finish_sum_max(total, best, at, &sum, &peak, &first);
    for (; i < P; ++i) {
      sum += row[i];
      if (row[i] > peak) { peak = row[i]; first = i; }
      colsum[i] += row[i];
      colmax[i] = row[i] > colmax[i] ? row[i] : colmax[i];
    }
    sv.argmax[c] = first < P ? first : 0;
    set_channel_pools(c, sum, peak, sv, s);
  }
  set_spatial_maps(colsum, colmax, sv, s);
}

// The gates of one sample, from its canonical [C][P] values: Mc, Ms and what backward needs, into sv.
template <typename Acc>
void gates_forward(const Acc* x, const Params<Acc>& w, Saved<Acc>& sv, Scratch<Acc>& t, const Spec& s) {
  switch (s.arrangement) {
    case CHANNEL_SPATIAL:  // Mc from x, Ms from x * Mc
      channel_pools(x, (const Acc*)nullptr, sv, s);
      channel_mlp(w, sv, t, s);
      spatial_pools(x, sv.mc, sv, t, s);
      spatial_conv(w, sv, t, s);
      break;
    case SPATIAL_CHANNEL:  // Ms from x, Mc from x * Ms
      spatial_pools(x, (const Acc*)nullptr, sv, t, s);
      spatial_conv(w, sv, t, s);
      channel_pools(x, sv.ms, sv, s);
      channel_mlp(w, sv, t, s);
      break;
    default:  // every gate from x
      pools_of_x(x, sv, t, s);
      if (s.channel()) channel_mlp(w, sv, t, s);
      if (s.spatial()) spatial_conv(w, sv, t, s);
  }
}

// out = x gated, read from and written to the sample's own memory layout (the input was read moments ago:
// it is in cache, and no canonical copy of the output is made).
template <typename T, typename Acc>
void write_output(const T* src, T* dst, const Saved<Acc>& sv, const Spec& s) {
  const int C = s.C, P = s.P(), a = s.arrangement;
  // Gate factors as Mc[c] * Ms[p] + add[c] + add_p[p]: the one loop below serves every arrangement.
  // channel-spatial / spatial-channel: Mc Ms; parallel: 1 + Mc + Ms (improvement 5); one gate: Mc or Ms.
  const bool both = a == CHANNEL_SPATIAL || a == SPATIAL_CHANNEL;
  auto mul_c = [&](int c) { return a == CHANNEL_ONLY || both ? sv.mc[c] : Acc(a == PARALLEL ? 1 : 0); };
  auto add_c = [&](int c) { return a == PARALLEL ? Acc(1) + sv.mc[c] : Acc(0); };
  const Acc* ms = s.spatial() ? sv.ms : nullptr;
  if (s.channels_last) {
    Acc* mul = (Acc*)__builtin_alloca(sizeof(Acc) * C);
    Acc* add = (Acc*)__builtin_alloca(sizeof(Acc) * C);
    for (int c = 0; c < C; ++c) { mul[c] = mul_c(c); add[c] = add_c(c); }
#if defined(__AVX512F__)
    if constexpr (std::is_same<Acc, float>::value)  // sixteen channels at a time, bf16 converted in registers
      if (C % BLOCK == 0) {
        for (int p = 0; p < P; ++p) {
          const T* in = src + (long)p * C;
          T* out = dst + (long)p * C;
          const Acc m = ms ? ms[p] : Acc(1);
          for (int c0 = 0; c0 < C; c0 += BLOCK) {
            const vec_t<Acc> v = load_row(in + c0);
            const vec_t<Acc> gated = a == SPATIAL_ONLY ? v * m : v * (load_vec(mul + c0) * m + load_vec(add + c0));
            store_row(out + c0, gated);
          }
        }
        return;
      }
#endif
    for (int p = 0; p < P; ++p) {
      const T* in = src + (long)p * C;
      T* out = dst + (long)p * C;
      const Acc m = ms ? ms[p] : Acc(1);
      if (a == SPATIAL_ONLY)
        for (int c = 0; c < C; ++c) Elem<T, Acc>::store(out, c, Elem<T, Acc>::load(in, c) * m);
      else
        for (int c = 0; c < C; ++c) Elem<T, Acc>::store(out, c, Elem<T, Acc>::load(in, c) * (mul[c] * m + add[c]));
    }
  } else {
    for (int c = 0; c < C; ++c) {
      const T* in = src + (long)c * P;
      T* out = dst + (long)c * P;
      const Acc mul = mul_c(c), add = add_c(c);
      if (a == CHANNEL_ONLY)
        for (int p = 0; p < P; ++p) Elem<T, Acc>::store(out, p, Elem<T, Acc>::load(in, p) * mul);
      else if (a == SPATIAL_ONLY)
        for (int p = 0; p < P; ++p) Elem<T, Acc>::store(out, p, Elem<T, Acc>::load(in, p) * ms[p]);
      else
        for (int p = 0; p < P; ++p) Elem<T, Acc>::store(out, p, Elem<T, Acc>::load(in, p) * (mul * ms[p] + add));
    }
  }
}

// out = relu(out + shortcut) over n elements: a residual block's end after its attention, right after the
// pass that wrote out (the sample is still in cache; unfused, the sum and the relu are two more passes over
// memory).
// A function of its own: out is read back as stored, in T, so no FMA joins the gated product to the sum, and
// the bits are those of the two ops.
template <typename T, typename Acc>
__attribute__((noinline)) void add_relu(T* out, const T* shortcut, long n) {
  for (long e = 0; e < n; ++e)
    Elem<T, Acc>::store(out, e, relu(Elem<T, Acc>::load(out, e) + Elem<T, Acc>::load(shortcut, e)));
}

// d(loss)/d(relu input) = g where the block's output is above zero (and NaN), else 0: torch.relu's gradient
// (threshold_backward), which is also the shortcut's gradient and the gated output's. Written to grad_shortcut.
template <typename T, typename Acc>
void relu_gradient(const T* g, const T* out, T* grad_shortcut, long n) {
  for (long e = 0; e < n; ++e) grad_shortcut[e] = Elem<T, Acc>::load(out, e) <= Acc(0) ? T(0) : g[e];
}

// What the spatial pools' backward needs per position, from d(loss)/d(maps) (t.dmaps) and the ties of
// each maximum (t.ties): the mean's share of each channel (avg), and the maximum's share of each tied
// channel (amax's backward: split evenly), into t.vec_p and t.vec_p2.
template <typename Acc>
void spatial_pool_shares(Scratch<Acc>& t, const Spec& s) {
  const int P = s.P(), avg = s.spool_index(AVG), max = s.spool_index(MAX);
  Acc* share_avg = t.vec_p.data();
  Acc* share_max = t.vec_p2.data();
  const Acc inv_c = Acc(1) / Acc(s.C);
  for (int p = 0; p < P; ++p) {
    share_avg[p] = avg >= 0 ? t.dmaps[(long)avg * P + p] * inv_c : Acc(0);
    share_max[p] = max >= 0 && t.ties[p] ? t.dmaps[(long)max * P + p] / Acc(t.ties[p]) : Acc(0);
  }
}

// out = y * Ms, y = x * Mc, Ms = SG(y), Mc = CG(x): two passes over (x, g) and one over dx.
template <typename Acc>
void backward_channel_spatial(const Acc* x, const Acc* g, Acc* dx, const Params<Acc>& w, const Saved<Acc>& sv,
                              Params<Acc>& grads, Scratch<Acc>& t, const Spec& s) {
  constexpr int L = LANES<Acc>;
  const int C = s.C, P = s.P(), max = s.spool_index(MAX);
  const Acc* peak = max >= 0 ? sv.smaps + (long)max * P : nullptr;
  Acc* d_ms = t.vec_p.data();
  int* ties = t.ties.data();
  for (int p = 0; p < P; ++p) { d_ms[p] = 0; ties[p] = 0; }
  // 1: d(loss)/d(Ms) = sum_c g * y, and how many channels hold each spatial maximum
  for (int c = 0; c < C; ++c) {
    const Acc* row = x + (long)c * s.R; const Acc* grow = g + (long)c * s.R; const Acc mc = sv.mc[c];
    for (int p = 0; p < P; ++p) {
      Acc y = row[p] * mc;
      d_ms[p] += grow[p] * y;
      if (peak) ties[p] += y == peak[p];
    }
  }
  spatial_backward_conv(d_ms, w, sv, grads, t, s);
  spatial_pool_shares(t, s);
  const Acc* share_avg = t.vec_p.data();
  const Acc* share_max = t.vec_p2.data();
  // 2: dy = g * Ms + the spatial pools' gradient; d(loss)/d(Mc) = sum_p dy * x; dx = dy * Mc
  Acc* d_mc = t.vec_c.data();
  for (int c = 0; c < C; ++c) {
    const Acc* row = x + (long)c * s.R; const Acc* grow = g + (long)c * s.R; Acc* drow = dx + (long)c * s.R;
    const Acc mc = sv.mc[c];
    vec_t<Acc> acc = {};
    int p = 0;
    for (; p + L <= P; p += L) {
      vec_t<Acc> xv = load_vec(row + p), y = xv * mc;
      vec_t<Acc> dy = load_vec(grow + p) * load_vec(sv.ms + p) + load_vec(share_avg + p);
      if (peak) dy += y == load_vec(peak + p) ? load_vec(share_max + p) : vec_t<Acc>{};
      acc += dy * xv;
      vec_t<Acc> out = dy * mc;
      std::memcpy(drow + p, &out, sizeof out);
    }
    Acc tail = 0;
    for (; p < P; ++p) {
      Acc y = row[p] * mc;
      Acc dy = grow[p] * sv.ms[p] + share_avg[p] + (peak && y == peak[p] ? share_max[p] : Acc(0));
      tail += dy * row[p];
      drow[p] = dy * mc;
    }
    Acc sum = tail;
    for (int l = 0; l < L; ++l) sum += acc[l];
    d_mc[c] = sum;
  }
  channel_backward_mlp(d_mc, w, sv, grads, t, s);
  channel_backward_pools(dx, sv, t, s);  // 3: the channel pools' gradient, of x
}

// out = z * Mc, z = x * Ms, Mc = CG(z), Ms = SG(x): the arrangement the paper found worse, op by op.
template <typename Acc>
void backward_spatial_channel(const Acc* x, Acc* g, Acc* dx, const Params<Acc>& w, const Saved<Acc>& sv,
                              Params<Acc>& grads, Scratch<Acc>& t, const Spec& s) {
  const int C = s.C, P = s.P();
  Acc* d_mc = t.vec_c.data();
  for (int c = 0; c < C; ++c) d_mc[c] = sum_of(g + (long)c * s.R, x + (long)c * s.R, P, sv.ms);
  channel_backward_mlp(d_mc, w, sv, grads, t, s);
  for (int c = 0; c < C; ++c) { Acc* grow = g + (long)c * s.R; Acc mc = sv.mc[c]; for (int p = 0; p < P; ++p) grow[p] *= mc; }
  channel_backward_pools(g, sv, t, s);  // dz = g * Mc + the channel pools' gradient (of z), in g
  Acc* d_ms = t.vec_p.data();
  for (int p = 0; p < P; ++p) d_ms[p] = 0;
  for (int c = 0; c < C; ++c) {
    const Acc* row = x + (long)c * s.R; const Acc* grow = g + (long)c * s.R; Acc* drow = dx + (long)c * s.R;
    for (int p = 0; p < P; ++p) { d_ms[p] += grow[p] * row[p]; drow[p] = grow[p] * sv.ms[p]; }
  }
  spatial_backward_conv(d_ms, w, sv, grads, t, s);
  spatial_backward_pools(dx, x, (const Acc*)nullptr, sv, t, s);
}

// Parallel (out = x + x * Mc + x * Ms) or one gate: every gate sees x itself. One pass over (x, g) for the
// gates' gradients, one writing dx.
template <typename Acc>
void backward_from_x(const Acc* x, const Acc* g, Acc* dx, const Params<Acc>& w, const Saved<Acc>& sv,
                     Params<Acc>& grads, Scratch<Acc>& t, const Spec& s) {
  constexpr int L = LANES<Acc>;
  const int C = s.C, P = s.P(), max = s.spool_index(MAX);
  const bool channel = s.channel(), spatial = s.spatial();
  const Acc* peak = spatial && max >= 0 ? sv.smaps + (long)max * P : nullptr;
  Acc* d_mc = t.vec_c.data();
  Acc* d_ms = t.vec_p.data();
  int* ties = t.ties.data();
  for (int p = 0; p < P; ++p) { d_ms[p] = 0; ties[p] = 0; }
  // 1: d(loss)/d(Mc) = sum_p g * x, d(loss)/d(Ms) = sum_c g * x, the ties of each spatial maximum
  for (int c = 0; c < C; ++c) {
    const Acc* row = x + (long)c * s.R; const Acc* grow = g + (long)c * s.R;
    if (channel) d_mc[c] = sum_of(grow, row, P);
    if (spatial)
      for (int p = 0; p < P; ++p) {
        d_ms[p] += grow[p] * row[p];
        if (peak) ties[p] += row[p] == peak[p];
      }
  }
  if (channel) channel_backward_mlp(d_mc, w, sv, grads, t, s);
  if (spatial) {
    spatial_backward_conv(d_ms, w, sv, grads, t, s);
    spatial_pool_shares(t, s);
  }
  const Acc* share_avg = t.vec_p.data();
  const Acc* share_max = t.vec_p2.data();
  const int cavg = s.cpool_index(AVG);
  // 2: dx = g * (1 + Mc + Ms | Mc | Ms) + the pools' gradients (the channel max's at its argmax, below)
  for (int c = 0; c < C; ++c) {
    const Acc* row = x + (long)c * s.R; const Acc* grow = g + (long)c * s.R; Acc* drow = dx + (long)c * s.R;
    const Acc mc = channel ? sv.mc[c] : Acc(0);
    const Acc add_c = channel && cavg >= 0 ? t.dv[(long)cavg * C + c] / Acc(P) : Acc(0);
    int p = 0;
    for (; p + L <= P; p += L) {
      vec_t<Acc> gv = load_vec(grow + p), out;
      if (s.arrangement == PARALLEL) out = gv + gv * mc + gv * load_vec(sv.ms + p);
      else if (s.arrangement == CHANNEL_ONLY) out = gv * mc;
      else out = gv * load_vec(sv.ms + p);
      out += add_c;
      if (spatial) {
        out += load_vec(share_avg + p);
        if (peak) out += load_vec(row + p) == load_vec(peak + p) ? load_vec(share_max + p) : vec_t<Acc>{};
      }
      std::memcpy(drow + p, &out, sizeof out);
    }
    for (; p < P; ++p) {
      Acc gp = grow[p], out;
      if (s.arrangement == PARALLEL) out = gp + gp * mc + gp * sv.ms[p];
      else if (s.arrangement == CHANNEL_ONLY) out = gp * mc;
      else out = gp * sv.ms[p];
      out += add_c;
      if (spatial) out += share_avg[p] + (peak && row[p] == peak[p] ? share_max[p] : Acc(0));
      drow[p] = out;
    }
  }
  const int cmax = s.cpool_index(MAX);
  if (channel && cmax >= 0)
    for (int c = 0; c < C; ++c) dx[(long)c * s.R + sv.argmax[c]] += t.dv[(long)cmax * C + c];  // the first maximum
}

// g: the output's gradient [C][P] (spatial-channel uses it as scratch); dx: [C][P].
template <typename Acc>
void backward_sample(const Acc* x, Acc* g, Acc* dx, const Params<Acc>& w, const Saved<Acc>& sv, Params<Acc>& grads,
                     Scratch<Acc>& t, const Spec& s) {
  if (s.spatial()) pad_maps(sv, t, s);
  if (s.arrangement == CHANNEL_SPATIAL) backward_channel_spatial(x, g, dx, w, sv, grads, t, s);
  else if (s.arrangement == SPATIAL_CHANNEL) backward_spatial_channel(x, g, dx, w, sv, grads, t, s);
  else backward_from_x(x, g, dx, w, sv, grads, t, s);
}

// A float32 (float64) NCHW sample is its own canonical buffer: no copy.
template <typename T, typename Acc>
constexpr bool in_place(const Spec& s) { return std::is_same<T, Acc>::value && !s.channels_last; }

// The sample's own memory when it is the canonical buffer, else rows of whole cache lines where that adds
// at most an eighth: the NHWC blocks then store and load aligned rows (a row across two lines costs two
// accesses; 14 x 14 maps measured 7-11% faster), while short rows keep their length (7 x 7 ones padded to
// 64 were slower: a third more memory for every pass).
template <typename T, typename Acc>
Spec with_row_stride(const Spec& spec) {
  Spec s = spec;
  const int P = spec.P(), lines = (P + 15) / 16 * 16;
  s.R = in_place<T, Acc>(spec) || lines * 8 > P * 9 ? P : lines;
  return s;
}

template <typename T, typename Acc>
void forward(const T* x, const T* shortcut, T* out, Acc** params, Acc* saved, int32_t* argmax, const Spec& spec) {
  const Spec s = with_row_stride<T, Acc>(spec);
  const long CP = (long)s.C * s.P();
  const long S = s.saved_size();
  Params<Acc> w(params, s);
#pragma omp parallel
  {
    Scratch<Acc>& t = Scratch<Acc>::for_this_thread(s);
#pragma omp for schedule(static)
    for (int n = 0; n < s.N; ++n) {
      Saved<Acc> sv(saved + n * S, argmax + (long)n * s.C, s);
      const Acc* canonical = t.x.data();
      if (in_place<T, Acc>(s)) canonical = reinterpret_cast<const Acc*>(x + n * CP);
      else load_sample<T, Acc>(x + n * CP, t.x.data(), s);
      gates_forward(canonical, w, sv, t, s);
      write_output<T, Acc>(x + n * CP, out + n * CP, sv, s);
      if (shortcut) add_relu<T, Acc>(out + n * CP, shortcut + n * CP, CP);
    }
  }
}

template <typename T, typename Acc>
void backward(const T* grad_out, const T* x, const T* out, T* grad_x, T* grad_shortcut, Acc** params,
              Acc** grad_params, const Acc* saved, const int32_t* argmax, const Spec& spec) {
  const Spec s = with_row_stride<T, Acc>(spec);
  const long CP = (long)s.C * s.P();
  const long S = s.saved_size();
  Params<Acc> w(params, s);
  std::vector<long> sizes = param_sizes(s);
  long total = 0;
  for (long z : sizes) total += z;
  const int threads = omp_get_max_threads();
  // One gradient buffer per thread, each thread a fixed block of samples, summed in thread order:
  // the same numbers on every run with the same thread count.
  std::vector<Acc> partial((long)threads * total, Acc(0));
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    std::vector<Acc*> mine;
    Acc* base = partial.data() + (long)tid * total;
    for (long z : sizes) { mine.push_back(base); base += z; }
    Params<Acc> grads(mine.data(), s);
    Scratch<Acc>& t = Scratch<Acc>::for_this_thread(s);
    const int lo = (int)((long)s.N * tid / nt), hi = (int)((long)s.N * (tid + 1) / nt);
    for (int n = lo; n < hi; ++n) {
      Saved<Acc> sv(const_cast<Acc*>(saved + n * S), const_cast<int32_t*>(argmax + (long)n * s.C), s);
      const Acc* canonical = t.x.data();
      if (in_place<T, Acc>(s)) canonical = reinterpret_cast<const Acc*>(x + n * CP);
      else load_sample<T, Acc>(x + n * CP, t.x.data(), s);
      // With a shortcut (out: relu(gated + shortcut)), the gated output's gradient is the relu's, which is
      // also the shortcut's: written there first, while the sample is in cache, and read back from there.
      const T* grad_gated = grad_out + n * CP;
      if (out) {
        relu_gradient<T, Acc>(grad_gated, out + n * CP, grad_shortcut + n * CP, CP);
        grad_gated = grad_shortcut + n * CP;
      }
      // spatial-channel works in its copy of g; the other arrangements only read it
      Acc* g = t.g.data();
      if (in_place<T, Acc>(s) && s.arrangement != SPATIAL_CHANNEL) g = const_cast<Acc*>(reinterpret_cast<const Acc*>(grad_gated));
      else load_sample<T, Acc>(grad_gated, g, s);
      if (in_place<T, Acc>(s)) {
        backward_sample(canonical, g, reinterpret_cast<Acc*>(grad_x + n * CP), w, sv, grads, t, s);
      } else {
        backward_sample(canonical, g, t.d.data(), w, sv, grads, t, s);
        store_sample<T, Acc>(t.d.data(), grad_x + n * CP, s);
      }
    }
  }
  long offset = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    for (long e = 0; e < sizes[i]; ++e) {
      Acc sum = 0;
      for (int th = 0; th < threads; ++th) sum += partial[(long)th * total + offset + e];
      grad_params[i][e] = sum;
    }
    offset += sizes[i];
  }
}

}  // namespace

extern "C" {

long cbam_saved_size(const int32_t* spec, int N, int C, int H, int W) {
  return read_spec(spec, N, C, H, W, 0).saved_size();
}

// shortcut (forward) and out, grad_shortcut (backward): null for the gated output alone, else the block's
// end relu(gated + shortcut) and its gradients.
int cbam_forward(int dtype, int channels_last, const void* x, const void* shortcut, void* out, void** params,
                 void* saved, int32_t* argmax, const int32_t* spec, int N, int C, int H, int W) {
  Spec s = read_spec(spec, N, C, H, W, channels_last);
  switch (dtype) {
    case F32:
      forward<float, float>((const float*)x, (const float*)shortcut, (float*)out, (float**)params, (float*)saved, argmax, s);
      return 0;
    case F64:
      forward<double, double>((const double*)x, (const double*)shortcut, (double*)out, (double**)params,
                              (double*)saved, argmax, s);
      return 0;
    case BF16:
      forward<uint16_t, float>((const uint16_t*)x, (const uint16_t*)shortcut, (uint16_t*)out, (float**)params,
                               (float*)saved, argmax, s);
      return 0;
  }
  return 1;
}

int cbam_backward(int dtype, int channels_last, const void* grad_out, const void* x, const void* out, void* grad_x,
                  void* grad_shortcut, void** params, void** grad_params, const void* saved, const int32_t* argmax,
                  const int32_t* spec, int N, int C, int H, int W) {
  Spec s = read_spec(spec, N, C, H, W, channels_last);
  switch (dtype) {
    case F32:
      backward<float, float>((const float*)grad_out, (const float*)x, (const float*)out, (float*)grad_x,
                             (float*)grad_shortcut, (float**)params, (float**)grad_params, (const float*)saved, argmax, s);
      return 0;
    case F64:
      backward<double, double>((const double*)grad_out, (const double*)x, (const double*)out, (double*)grad_x,
                               (double*)grad_shortcut, (double**)params, (double**)grad_params, (const double*)saved,
                               argmax, s);
      return 0;
    case BF16:
      backward<uint16_t, float>((const uint16_t*)grad_out, (const uint16_t*)x, (const uint16_t*)out,
                                (uint16_t*)grad_x, (uint16_t*)grad_shortcut, (float**)params, (float**)grad_params,
                                (const float*)saved, argmax, s);
      return 0;
  }
  return 1;
}
}
