// Sparse <-> dense (B, C, S) with S the flat spatial size; site[i] = b * S + flat position.
template <typename T>
__global__ void scatter_dense(const T* __restrict__ features, const long long* __restrict__ site,
                              T* __restrict__ dense, long long n, long long channels,
                              long long volume) {
    SG_LOOP(t, n * channels) {
        long long i = t / channels;
        long long c = t - i * channels;
        long long b = site[i] / volume;
        dense[(b * channels + c) * volume + (site[i] - b * volume)] = features[t];
    }
}

template <typename T>
__global__ void gather_dense(const T* __restrict__ dense, const long long* __restrict__ site,
                             T* __restrict__ features, long long n, long long channels,
                             long long volume) {
    SG_LOOP(t, n * channels) {
        long long i = t / channels;
        long long c = t - i * channels;
        long long b = site[i] / volume;
        features[t] = dense[(b * channels + c) * volume + (site[i] - b * volume)];
    }
}
