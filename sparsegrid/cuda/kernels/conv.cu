// Gather-GEMM-scatter pieces: the scatter half of one kernel offset (the gather and the
// GEMM are cupy.take and cuBLAS). Within one offset every output row appears at most
// once, so each (row, channel) is updated by exactly one thread: no atomics, and the
// offsets run one after another in a fixed order.

// out[rows[i], c] += src[i, c]     (A: the accumulation type, float for float16 data)
template <typename T, typename A>
__global__ void scatter_add_rows(const T* __restrict__ src, const int* __restrict__ rows,
                                 A* __restrict__ out, long long n, long long channels) {
    SG_LOOP(t, n * channels) {
        long long i = t / channels;
        long long c = t - i * channels;
        out[(long long)rows[i] * channels + c] += sg_load<A>(src[t]);
    }
}

// out[out_rows[i], c] += src[in_rows[i], c]   (unit weights: sum pooling, unpooling)
template <typename T, typename A>
__global__ void gather_scatter_add(const T* __restrict__ src, const int* __restrict__ in_rows,
                                   const int* __restrict__ out_rows, A* __restrict__ out,
                                   long long n, long long channels) {
    SG_LOOP(t, n * channels) {
        long long i = t / channels;
        long long c = t - i * channels;
        out[(long long)out_rows[i] * channels + c] +=
            sg_load<A>(src[(long long)in_rows[i] * channels + c]);
    }
}

// dst[i] = (T) src[i]: the accumulator rounded once to the data type.
template <typename T, typename A>
__global__ void store_rounded(const A* __restrict__ src, T* __restrict__ dst, long long n) {
    SG_LOOP(i, n) { dst[i] = sg_store<T>(src[i]); }
}
