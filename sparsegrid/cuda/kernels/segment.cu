// Segment reductions (input layers, voxelization, global pooling) in two passes with no
// atomics. The rows of segment s are order[ptr[s]] ... order[ptr[s+1] - 1], in row order;
// each segment is cut into chunks of SG_CHUNK rows (chunk_ptr[s] is its first chunk).
// Pass 1: a thread per (chunk, channel) reduces its chunk's rows in order. Pass 2: a
// thread per (segment, channel) folds its chunks in order. A segment of at most SG_CHUNK
// rows is one chunk: its rows are reduced one after another, as on the CPU.
// mode 0: sum, 1: mean, 2: max (chosen = the first row holding the maximum; a NaN beats
// every number and the first NaN is kept). Empty segments: 0, chosen -1.
#define SG_CHUNK 64

template <typename A> __device__ __forceinline__ bool sg_better(A v, A best) {
    return v > best || (sg_isnan(v) && !sg_isnan(best));
}

template <typename T, typename A>
__global__ void segment_chunks(const T* __restrict__ values, const long long* __restrict__ order,
                               const long long* __restrict__ ptr,
                               const long long* __restrict__ chunk_ptr,
                               const long long* __restrict__ chunk_segment,
                               A* __restrict__ partial, long long* __restrict__ partial_row,
                               long long n_slots, long long n_segments, long long channels,
                               int mode) {
    SG_LOOP(t, n_slots * channels) {
        long long slot = t / channels;
        long long c = t - slot * channels;
        long long s = chunk_segment[slot];
        if (s >= n_segments) continue;                  // a slot past the last chunk
        long long begin = ptr[s] + (slot - chunk_ptr[s]) * SG_CHUNK;
        long long end = begin + SG_CHUNK < ptr[s + 1] ? begin + SG_CHUNK : ptr[s + 1];
        long long best_row = order[begin];
        A acc = sg_load<A>(values[best_row * channels + c]);
        for (long long q = begin + 1; q < end; ++q) {
            long long row = order[q];
            A v = sg_load<A>(values[row * channels + c]);
            if (mode == 2) {
                if (sg_better(v, acc)) { acc = v; best_row = row; }
            } else {
                acc += v;
            }
        }
        partial[t] = acc;
        partial_row[t] = best_row;
    }
}

template <typename T, typename A>
__global__ void segment_finish(const A* __restrict__ partial,
                               const long long* __restrict__ partial_row,
                               const long long* __restrict__ ptr,
                               const long long* __restrict__ chunk_ptr, T* __restrict__ out,
                               long long* __restrict__ chosen, long long n_segments,
                               long long channels, int mode) {
    SG_LOOP(t, n_segments * channels) {
        long long s = t / channels;
        long long c = t - s * channels;
        long long first = chunk_ptr[s], last = chunk_ptr[s + 1];
        if (first == last) {
            out[t] = sg_store<T>((A)0);
            if (mode == 2) chosen[t] = -1;
            continue;
        }
        A acc = partial[first * channels + c];
        long long best_row = partial_row[first * channels + c];
        for (long long k = first + 1; k < last; ++k) {
            A v = partial[k * channels + c];
            if (mode == 2) {
                if (sg_better(v, acc)) { acc = v; best_row = partial_row[k * channels + c]; }
            } else {
                acc += v;
            }
        }
        if (mode == 1) acc = acc / (A)(ptr[s + 1] - ptr[s]);
        out[t] = sg_store<T>(acc);
        if (mode == 2) chosen[t] = best_row;
    }
}

// dst[rows[i], c] = src[i, c] for rows[i] >= 0 (rows distinct): first/last gradients.
template <typename T>
__global__ void scatter_rows(const T* __restrict__ src, const long long* __restrict__ rows,
                             T* __restrict__ dst, long long n, long long channels) {
    SG_LOOP(t, n * channels) {
        long long i = t / channels;
        long long row = rows[i];
        if (row >= 0) dst[row * channels + (t - i * channels)] = src[t];
    }
}

// dst[cells[t], c] = src[t] for cells[t] >= 0, cells (n, C) of rows (distinct per channel):
// max gradients.
template <typename T>
__global__ void scatter_cells(const T* __restrict__ src, const long long* __restrict__ rows,
                              T* __restrict__ dst, long long n, long long channels) {
    SG_LOOP(t, n * channels) {
        long long row = rows[t];
        if (row >= 0) dst[row * channels + (t % channels)] = src[t];
    }
}
