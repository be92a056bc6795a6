// Segment reductions (input layers, voxelization, global pooling): one thread per
// (segment, channel) reduces the segment's rows order[ptr[s]] ... order[ptr[s+1] - 1] in
// that (row) order. mode 0: sum, 1: mean, 2: max (chosen = the first row holding the
// maximum; a NaN beats every number and the first NaN is kept). Empty segments: 0, -1.
template <typename T, typename A>
__global__ void segment_reduce_rows(const T* __restrict__ values, const long long* __restrict__ order,
                                    const long long* __restrict__ ptr, T* __restrict__ out,
                                    long long* __restrict__ chosen, long long n_segments,
                                    long long channels, int mode) {
    SG_LOOP(t, n_segments * channels) {
        long long s = t / channels;
        long long c = t - s * channels;
        long long begin = ptr[s], end = ptr[s + 1];
        if (begin == end) {
            out[t] = sg_store<T>((A)0);
            if (mode == 2) chosen[t] = -1;
            continue;
        }
        if (mode == 2) {
            long long best_row = order[begin];
            A best = sg_load<A>(values[best_row * channels + c]);
            for (long long q = begin + 1; q < end; ++q) {
                long long row = order[q];
                A v = sg_load<A>(values[row * channels + c]);
                if (v > best || (sg_isnan(v) && !sg_isnan(best))) { best = v; best_row = row; }
            }
            out[t] = sg_store<T>(best);
            chosen[t] = best_row;
        } else {
            A total = (A)0;
            for (long long q = begin; q < end; ++q) total += sg_load<A>(values[order[q] * channels + c]);
            if (mode == 1) total = total / (A)(end - begin);
            out[t] = sg_store<T>(total);
        }
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
