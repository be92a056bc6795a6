// Fused implicit-GEMM sparse convolution on tensor cores (sm_80 and later).
//
// Output-stationary: a block of 128 threads (4 warps, 2 x 2) owns BM sorted output rows x
// BN output channels. It loops over the kernel offsets its tile uses (the OR of the rows'
// neighbour masks, rows sorted by mask: sparsegrid/neighbours.py) times BK-wide chunks of
// the input channels; for each it gathers the BM input rows the neighbour map names into
// shared memory (cp.async 16-byte copies, zero-filled where a row is absent or past the
// channels; plain loads when the channels are not multiples of 16 bytes), with the next
// chunk's copies in flight while the current one is multiplied (two stages). The
// multiplication is mma.sync: m16n8k16 for float16 / bfloat16 data, m16n8k8 TF32 for
// float32, accumulating in float32 registers. The epilogue adds the bias, applies the
// optional activation, rounds once to the data type and writes each output element once.
//
// Exceptions to the house rules of common.cuh, for these kernels only: they use shared
// memory, __syncthreads and warp-level instructions, and their launch shape is fixed (128
// threads, grid = (row tiles, channel tiles)). Still no atomics: every output element and
// every partial sum is written by one thread, and each sum runs in a fixed order (offsets
// increasing, channel chunks increasing; the weight gradient's slices are added in slice
// order by wgrad_reduce), so results are the same bits run after run. For finite weights
// they do not depend on BM / BN either: a tile skips only offsets none of its rows uses,
// whose terms are 0. (A row without offset k multiplies a zero-filled input row by W[k]:
// an Inf or NaN in W[k] then gives NaN there, as a GEMM over zero-padded rows would.)
//
// The host emulator of the test suite (tests/cupy_emulator.py) runs these kernels with one
// host thread per CUDA thread and emulates mma.sync lane by lane with the fragment layouts
// of the PTX ISA (SG_HOST_EMULATION), so the index arithmetic below is tested without a GPU.

#define SG_IG_THREADS 128
#define SG_IG_MAX_K 512

#ifndef SG_HOST_EMULATION
#define SG_IG_ENABLED (__CUDA_ARCH__ >= 800)
#else
#define SG_IG_ENABLED 1
#endif

// bfloat16 storage: its own type so that templates tell it from float16.
struct sg_bf16 { unsigned short bits; };

__device__ __forceinline__ unsigned sg_f2u(float f) {
#ifdef SG_HOST_EMULATION
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
#else
    unsigned u;
    asm("mov.b32 %0, %1;" : "=r"(u) : "f"(f));
    return u;
#endif
}
__device__ __forceinline__ float sg_u2f(unsigned u) {
#ifdef SG_HOST_EMULATION
    float f;
    memcpy(&f, &u, 4);
    return f;
#else
    float f;
    asm("mov.b32 %0, %1;" : "=f"(f) : "r"(u));
    return f;
#endif
}

template <> __device__ __forceinline__ float sg_load<float, sg_bf16>(sg_bf16 v) {
    return sg_u2f(((unsigned)v.bits) << 16);
}
template <> __device__ __forceinline__ sg_bf16 sg_store<sg_bf16, float>(float v) {
    const unsigned u = sg_f2u(v);
    sg_bf16 h;
    if ((u & 0x7fffffffu) > 0x7f800000u) {             // NaN stays a (quiet) NaN
        h.bits = (unsigned short)((u >> 16) | 0x40u);
    } else {                                          // round to nearest even
        h.bits = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    return h;
}

template <typename T> struct sg_ig;
// KSTEP: the mma's k; VEC: elements per 16-byte copy; KPAD: the padding of a tile stored
// k-major ([k][m or n], read at rows k0 + 2t or k0 + t and columns g): 8 elements puts the
// four t of a fragment read on distinct banks for 16-bit and 32-bit data alike.
template <> struct sg_ig<sg_half> {
    static constexpr int KSTEP = 16, VEC = 8, KPAD = 8;
    __device__ __forceinline__ static unsigned short bits(sg_half v) { return v; }
    __device__ __forceinline__ static sg_half zero() { return 0; }
};
template <> struct sg_ig<sg_bf16> {
    static constexpr int KSTEP = 16, VEC = 8, KPAD = 8;
    __device__ __forceinline__ static unsigned short bits(sg_bf16 v) { return v.bits; }
    __device__ __forceinline__ static sg_bf16 zero() { sg_bf16 z; z.bits = 0; return z; }
};
template <> struct sg_ig<float> {
    static constexpr int KSTEP = 8, VEC = 4, KPAD = 8;
    __device__ __forceinline__ static float zero() { return 0.0f; }
};

__device__ __forceinline__ unsigned sg_pack2(unsigned short lo, unsigned short hi) {
    return (unsigned)lo | ((unsigned)hi << 16);
}

// float -> TF32 (round to nearest, ties away: cvt.rna), kept in a 32-bit register.
__device__ __forceinline__ unsigned sg_tf32(float f) {
#ifdef SG_HOST_EMULATION
    unsigned u = sg_f2u(f);
    if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
    return u;
#else
    unsigned u;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(u) : "f"(f));
    return u;
#endif
}

// --- asynchronous copies -------------------------------------------------------------
__device__ __forceinline__ void sg_cp_async16(void* dst, const void* src, bool valid) {
#ifdef SG_HOST_EMULATION
    if (valid) memcpy(dst, src, 16); else memset(dst, 0, 16);
#elif __CUDA_ARCH__ >= 800
    unsigned address;
    asm volatile("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }"
                 : "=r"(address) : "l"(dst));
    int bytes = valid ? 16 : 0;                       // 0: the 16 bytes are zero-filled
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :: "r"(address), "l"(src), "r"(bytes) : "memory");
#endif
}
__device__ __forceinline__ void sg_cp_async_commit() {
#if !defined(SG_HOST_EMULATION) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
template <int N> __device__ __forceinline__ void sg_cp_async_wait() {
#if !defined(SG_HOST_EMULATION) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
#endif
}

// --- one warp-wide multiply-accumulate: d += a * b (16 x 8 outputs per warp) ---------
template <typename T> __device__ __forceinline__ void sg_mma(float* d, const unsigned* a,
                                                             const unsigned* b);
template <> __device__ __forceinline__ void sg_mma<sg_half>(float* d, const unsigned* a,
                                                            const unsigned* b) {
#ifdef SG_HOST_EMULATION
    sg_emu_mma(0, d, a, b);
#elif __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
template <> __device__ __forceinline__ void sg_mma<sg_bf16>(float* d, const unsigned* a,
                                                            const unsigned* b) {
#ifdef SG_HOST_EMULATION
    sg_emu_mma(1, d, a, b);
#elif __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
template <> __device__ __forceinline__ void sg_mma<float>(float* d, const unsigned* a,
                                                          const unsigned* b) {
#ifdef SG_HOST_EMULATION
    sg_emu_mma(2, d, a, b);
#elif __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// Two consecutive 16-bit values as one 32-bit load (the first in the low half).
template <typename T> __device__ __forceinline__ unsigned sg_load_pair(const T* p) {
#ifdef SG_HOST_EMULATION
    unsigned u;
    memcpy(&u, p, 4);
    return u;
#else
    return *reinterpret_cast<const unsigned*>(p);
#endif
}

// --- fragments from shared memory (PTX ISA layouts; g = lane / 4, t = lane % 4) -------
// A is M x K, stored row-major ([m][k], A_KMAJOR false) or as its transpose ([k][m]);
// B is K x N stored [k][n]. Fragment rows / columns are relative to (m0, k0) and (k0, n0).
template <typename T, bool A_KMAJOR>
__device__ __forceinline__ void sg_fragment_a(unsigned* a, const T* s, int ld, int m0, int k0,
                                              int lane) {
    const int g = lane >> 2, t = lane & 3;
#define SG_A(m, k) (A_KMAJOR ? s[(k) * ld + (m)] : s[(m) * ld + (k)])
    if constexpr (sg_ig<T>::KSTEP == 16) {
        const int r0 = m0 + g, r1 = m0 + g + 8, c0 = k0 + 2 * t, c1 = k0 + 2 * t + 8;
        if constexpr (!A_KMAJOR) {     // (m, k) and (m, k + 1) are adjacent, k even
            a[0] = sg_load_pair(s + r0 * ld + c0);
            a[1] = sg_load_pair(s + r1 * ld + c0);
            a[2] = sg_load_pair(s + r0 * ld + c1);
            a[3] = sg_load_pair(s + r1 * ld + c1);
        } else {
            a[0] = sg_pack2(sg_ig<T>::bits(SG_A(r0, c0)), sg_ig<T>::bits(SG_A(r0, c0 + 1)));
            a[1] = sg_pack2(sg_ig<T>::bits(SG_A(r1, c0)), sg_ig<T>::bits(SG_A(r1, c0 + 1)));
            a[2] = sg_pack2(sg_ig<T>::bits(SG_A(r0, c1)), sg_ig<T>::bits(SG_A(r0, c1 + 1)));
            a[3] = sg_pack2(sg_ig<T>::bits(SG_A(r1, c1)), sg_ig<T>::bits(SG_A(r1, c1 + 1)));
        }
    } else {
        const int r0 = m0 + g, r1 = m0 + g + 8, c0 = k0 + t, c1 = k0 + t + 4;
        a[0] = sg_tf32(SG_A(r0, c0));
        a[1] = sg_tf32(SG_A(r1, c0));
        a[2] = sg_tf32(SG_A(r0, c1));
        a[3] = sg_tf32(SG_A(r1, c1));
    }
#undef SG_A
}

template <typename T>
__device__ __forceinline__ void sg_fragment_b(unsigned* b, const T* s, int ld, int k0, int n0,
                                              int lane) {
    const int g = lane >> 2, t = lane & 3, n = n0 + g;
    if constexpr (sg_ig<T>::KSTEP == 16) {
        const int k = k0 + 2 * t;
        b[0] = sg_pack2(sg_ig<T>::bits(s[k * ld + n]), sg_ig<T>::bits(s[(k + 1) * ld + n]));
        b[1] = sg_pack2(sg_ig<T>::bits(s[(k + 8) * ld + n]),
                        sg_ig<T>::bits(s[(k + 9) * ld + n]));
    } else {
        const int k = k0 + t;
        b[0] = sg_tf32(s[k * ld + n]);
        b[1] = sg_tf32(s[(k + 4) * ld + n]);
    }
}

// One stage of a warp's MI x NI tile of 16 x 8 accumulators: acc += A[m0.., 0..BK) *
// B[0..BK, n0..) from the shared tiles (A stored [m][k], or [k][m] with A_KMAJOR).
template <typename T, bool A_KMAJOR, int MI, int NI, int BK>
__device__ __forceinline__ void sg_warp_tile_mma(float (&acc)[MI][NI][4], const T* as, int lda,
                                                 const T* bs, int ldb, int m0, int n0,
                                                 int lane) {
#pragma unroll
    for (int kk = 0; kk < BK; kk += sg_ig<T>::KSTEP) {
        unsigned a[MI][4], b[NI][2];
#pragma unroll
        for (int i = 0; i < MI; ++i)
            sg_fragment_a<T, A_KMAJOR>(a[i], as, lda, m0 + i * 16, kk, lane);
#pragma unroll
        for (int j = 0; j < NI; ++j) sg_fragment_b<T>(b[j], bs, ldb, kk, n0 + j * 8, lane);
#pragma unroll
        for (int i = 0; i < MI; ++i)
#pragma unroll
            for (int j = 0; j < NI; ++j) sg_mma<T>(acc[i][j], a[i], b[j]);
    }
}

// --- the convolution ------------------------------------------------------------------
// y[order[s], n] = act(bias[n] + sum_k sum_c x[kmap[k, s], c] * w[k, c, n]) for the
// sorted rows s < n_out. kmap: int32 (K, n_pad), -1 absent; tile_masks: int32
// (n_pad / BM, words), bit k of a tile = some row of it has offset k. act: 0 none,
// 1 ReLU, 2 leaky ReLU with slope `slope`. VEC: channels and pointers allow 16-byte
// copies (cin and cout multiples of sg_ig<T>::VEC, 16-byte aligned arrays).
template <typename T, int BM, int BN, int BK, bool VEC>
__global__ void __launch_bounds__(SG_IG_THREADS) implicit_gemm_conv(
    const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
    const int* __restrict__ kmap, const int* __restrict__ order,
    const int* __restrict__ tile_masks, T* __restrict__ y, int n_out, int n_pad,
    int n_offsets, int words, int cin, int cout, int has_bias, int act, float slope) {
#if SG_IG_ENABLED
    constexpr int KSTEP = sg_ig<T>::KSTEP, V = sg_ig<T>::VEC;
    constexpr int WM = BM / 2, WN = BN / 2, MI = WM / 16, NI = WN / 8;
    // padded rows (16-byte multiples) that keep the fragment reads free of bank conflicts
    constexpr int LDA = BK + V, LDB = BN + sg_ig<T>::KPAD;
    static_assert(BK % KSTEP == 0 && BK % V == 0 && BN % V == 0 && MI >= 1 && NI >= 1,
                  "tile shape");
    __shared__ __align__(16) T a_tile[2][BM * LDA];
    __shared__ __align__(16) T b_tile[2][BK * LDB];
    __shared__ int offsets[SG_IG_MAX_K];
    __shared__ int n_used;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int warp_m = warp >> 1, warp_n = warp & 1;
    const int tile = blockIdx.x, row0 = tile * BM, n0 = blockIdx.y * BN;

    if (tid == 0) {
        int count = 0;
        for (int word = 0; word < words; ++word) {
            unsigned bits = (unsigned)tile_masks[(long long)tile * words + word];
            while (bits) {
                const int bit = __ffs((int)bits) - 1;
                offsets[count++] = word * 32 + bit;
                bits &= bits - 1;
            }
        }
        n_used = count;
    }
    __syncthreads();
    const int chunks = (cin + BK - 1) / BK;
    const int n_iter = n_used * chunks;

    float acc[MI][NI][4] = {};

    auto load = [&](int stage, int it) {
        const int k = offsets[it / chunks];
        const int c0 = (it % chunks) * BK;
        const int* rows = kmap + (long long)k * n_pad + row0;
        const T* wk = w + (long long)k * cin * cout;
        T* as = a_tile[stage];
        T* bs = b_tile[stage];
        if constexpr (VEC) {
            for (int v = tid; v < BM * (BK / V); v += SG_IG_THREADS) {
                const int r = v / (BK / V), c = (v % (BK / V)) * V;
                const int src = rows[r];
                const bool ok = src >= 0 && c0 + c < cin;
                sg_cp_async16(as + r * LDA + c, ok ? x + (long long)src * cin + c0 + c : x, ok);
            }
            for (int v = tid; v < BK * (BN / V); v += SG_IG_THREADS) {
                const int r = v / (BN / V), c = (v % (BN / V)) * V;
                const bool ok = c0 + r < cin && n0 + c < cout;
                sg_cp_async16(bs + r * LDB + c,
                              ok ? wk + (long long)(c0 + r) * cout + n0 + c : w, ok);
            }
        } else {
            for (int e = tid; e < BM * BK; e += SG_IG_THREADS) {
                const int r = e / BK, c = e % BK;
                const int src = rows[r];
                as[r * LDA + c] = (src >= 0 && c0 + c < cin)
                                      ? x[(long long)src * cin + c0 + c] : sg_ig<T>::zero();
            }
            for (int e = tid; e < BK * BN; e += SG_IG_THREADS) {
                const int r = e / BN, c = e % BN;
                bs[r * LDB + c] = (c0 + r < cin && n0 + c < cout)
                                      ? wk[(long long)(c0 + r) * cout + n0 + c]
                                      : sg_ig<T>::zero();
            }
        }
        sg_cp_async_commit();
    };

    if (n_iter > 0) load(0, 0);
    for (int it = 0; it < n_iter; ++it) {
        const int stage = it & 1;
        if (it + 1 < n_iter) {
            load(stage ^ 1, it + 1);
            sg_cp_async_wait<1>();
        } else {
            sg_cp_async_wait<0>();
        }
        __syncthreads();
        const T* as = a_tile[stage];
        const T* bs = b_tile[stage];
        sg_warp_tile_mma<T, false, MI, NI, BK>(acc, as, LDA, bs, LDB, warp_m * WM,
                                               warp_n * WN, lane);
        __syncthreads();
    }

    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int s = row0 + warp_m * WM + i * 16 + g + (q >> 1) * 8;
                const int n = n0 + warp_n * WN + j * 8 + 2 * t + (q & 1);
                if (s < n_out && n < cout) {
                    float v = acc[i][j][q];
                    if (has_bias) v += sg_load<float>(bias[n]);
                    if (act == 1) v = v < 0.0f ? 0.0f : v;          // NaN stays NaN
                    else if (act == 2) v = v < 0.0f ? v * slope : v;
                    y[(long long)order[s] * cout + n] = sg_store<T>(v);
                }
            }
#endif
}

// --- the weight gradient: deterministic split-K ---------------------------------------
// partial[z, k, c, n] = sum over the sorted rows s of slice z (rows_per_slice each, in
// BK-row chunks, skipping chunks none of whose rows has offset k) of
// x[kmap[k, s], c] * g[order[s], n]. grid = (cin tiles * cout tiles, K, slices): every
// partial element is written (zeros where a slice has no pair) by one thread; the slices
// are then summed in slice order by wgrad_reduce. chunk_masks: int32 (n_pad / BK, words).
template <typename T, int BM, int BN, int BK, bool VEC>
__global__ void __launch_bounds__(SG_IG_THREADS) implicit_gemm_wgrad(
    const T* __restrict__ x, const T* __restrict__ grad, const int* __restrict__ kmap,
    const int* __restrict__ order, const int* __restrict__ chunk_masks,
    float* __restrict__ partial, int n_out, int n_pad, int n_offsets, int words, int cin,
    int cout, int rows_per_slice) {
#if SG_IG_ENABLED
    constexpr int KSTEP = sg_ig<T>::KSTEP, V = sg_ig<T>::VEC;
    constexpr int WM = BM / 2, WN = BN / 2, MI = WM / 16, NI = WN / 8;
    constexpr int LDA = BM + sg_ig<T>::KPAD, LDB = BN + sg_ig<T>::KPAD;
    static_assert(BK % KSTEP == 0 && BM % V == 0 && BN % V == 0, "tile shape");
    __shared__ __align__(16) T a_tile[2][BK * LDA];    // [row][input channel]
    __shared__ __align__(16) T b_tile[2][BK * LDB];    // [row][output channel]

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int warp_m = warp >> 1, warp_n = warp & 1;
    const int m_tiles = (cin + BM - 1) / BM;
    const int m0 = (blockIdx.x % m_tiles) * BM, n0 = (blockIdx.x / m_tiles) * BN;
    const int k = blockIdx.y, z = blockIdx.z;
    const int first = (z * rows_per_slice) / BK;
    const int end = (z + 1) * rows_per_slice;
    const int last = (end < n_pad ? end : n_pad) / BK;   // chunk range [first, last)
    const int* mk = kmap + (long long)k * n_pad;

    auto used = [&](int chunk) {
        return (chunk_masks[(long long)chunk * words + (k >> 5)] >> (k & 31)) & 1;
    };
    auto next = [&](int chunk) {
        while (chunk < last && !used(chunk)) ++chunk;
        return chunk;
    };

    float acc[MI][NI][4] = {};

    auto load = [&](int stage, int chunk) {
        const int s0 = chunk * BK;
        T* as = a_tile[stage];
        T* bs = b_tile[stage];
        if constexpr (VEC) {
            for (int v = tid; v < BK * (BM / V); v += SG_IG_THREADS) {
                const int r = v / (BM / V), c = (v % (BM / V)) * V;
                const int src = mk[s0 + r];
                const bool ok = src >= 0 && m0 + c < cin;
                sg_cp_async16(as + r * LDA + c, ok ? x + (long long)src * cin + m0 + c : x, ok);
            }
            for (int v = tid; v < BK * (BN / V); v += SG_IG_THREADS) {
                const int r = v / (BN / V), c = (v % (BN / V)) * V;
                const int s = s0 + r;
                const bool ok = s < n_out && mk[s] >= 0 && n0 + c < cout;
                sg_cp_async16(bs + r * LDB + c,
                              ok ? grad + (long long)order[s] * cout + n0 + c : grad, ok);
            }
        } else {
            for (int e = tid; e < BK * BM; e += SG_IG_THREADS) {
                const int r = e / BM, c = e % BM;
                const int src = mk[s0 + r];
                as[r * LDA + c] = (src >= 0 && m0 + c < cin)
                                      ? x[(long long)src * cin + m0 + c] : sg_ig<T>::zero();
            }
            for (int e = tid; e < BK * BN; e += SG_IG_THREADS) {
                const int r = e / BN, c = e % BN;
                const int s = s0 + r;
                bs[r * LDB + c] = (s < n_out && mk[s] >= 0 && n0 + c < cout)
                                      ? grad[(long long)order[s] * cout + n0 + c]
                                      : sg_ig<T>::zero();
            }
        }
        sg_cp_async_commit();
    };

    int chunk = next(first);
    if (chunk < last) load(0, chunk);
    for (int stage = 0; chunk < last; stage ^= 1) {
        const int following = next(chunk + 1);
        if (following < last) {
            load(stage ^ 1, following);
            sg_cp_async_wait<1>();
        } else {
            sg_cp_async_wait<0>();
        }
        __syncthreads();
        const T* as = a_tile[stage];
        const T* bs = b_tile[stage];
        sg_warp_tile_mma<T, true, MI, NI, BK>(acc, as, LDA, bs, LDB, warp_m * WM,
                                              warp_n * WN, lane);
        __syncthreads();
        chunk = following;
    }

    float* out = partial + ((long long)z * n_offsets + k) * cin * cout;
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int c = m0 + warp_m * WM + i * 16 + g + (q >> 1) * 8;
                const int n = n0 + warp_n * WN + j * 8 + 2 * t + (q & 1);
                if (c < cin && n < cout) out[(long long)c * cout + n] = acc[i][j][q];
            }
#endif
}

// out[i] = (T) sum over z of partial[z * n + i], z increasing (a grid-stride loop).
template <typename T>
__global__ void wgrad_reduce(const float* __restrict__ partial, T* __restrict__ out,
                             long long n, int slices) {
    SG_LOOP(i, n) {
        float sum = 0.0f;
        for (int z = 0; z < slices; ++z) sum += partial[(long long)z * n + i];
        out[i] = sg_store<T>(sum);
    }
}
