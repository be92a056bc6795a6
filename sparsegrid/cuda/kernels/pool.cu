// Max pooling over one kernel offset: out[o, c] = in[i, c] where strictly greater
// (earlier offsets win ties; a NaN never replaces anything), argmax records the row.
template <typename T>
__global__ void max_pool_offset(const T* __restrict__ features, const int* __restrict__ in_rows,
                                const int* __restrict__ out_rows, T* __restrict__ out,
                                int* __restrict__ argmax, long long n, long long channels) {
    SG_LOOP(t, n * channels) {
        long long i = t / channels;
        long long c = t - i * channels;
        long long src = (long long)in_rows[i] * channels + c;
        long long dst = (long long)out_rows[i] * channels + c;
        T candidate = features[src];
        if (sg_load<double>(candidate) > sg_load<double>(out[dst])) {
            out[dst] = candidate;
            argmax[dst] = in_rows[i];
        }
    }
}

// out[s] = sum of values[order[q]] for q in [ptr[s], ptr[s + 1]), in that order, added in
// float64 and rounded once (max-pool gradients: every output cell that picked input cell s).
template <typename T>
__global__ void ordered_cell_sum(const T* __restrict__ values, const long long* __restrict__ order,
                                 const long long* __restrict__ ptr, T* __restrict__ out,
                                 long long n_cells) {
    SG_LOOP(s, n_cells) {
        double total = 0.0;
        for (long long q = ptr[s]; q < ptr[s + 1]; ++q) total += sg_load<double>(values[order[q]]);
        out[s] = sg_store<T>(total);
    }
}
