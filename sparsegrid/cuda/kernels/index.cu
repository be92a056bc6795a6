// Coordinate index queries: binary search of int64 keys in a sorted key array.

// found[j * n + p] = the sorted position of keys[p] + deltas[j] in keys, or -1.
// keys: sorted (strictly increasing), n < 2**31.
extern "C" __global__ void neighbour_search(const long long* __restrict__ keys, long long n,
                                            const long long* __restrict__ deltas,
                                            long long n_deltas, int* __restrict__ found) {
    SG_LOOP(t, n * n_deltas) {
        long long j = t / n;
        long long p = t - j * n;
        long long q = keys[p] + deltas[j];
        long long lo = 0, hi = n;
        while (lo < hi) {
            long long mid = (lo + hi) >> 1;
            if (keys[mid] < q) lo = mid + 1; else hi = mid;
        }
        found[t] = (lo < n && keys[lo] == q) ? (int)lo : -1;
    }
}
