//! Parallel loops for the kernels, on rayon's global pool (the one `gemm` and candle's matrix
//! products use; sized by `RAYON_NUM_THREADS`, else the cores).
//!
//! candle 0.11.1 also has a "barrier pool" for its element-wise ops (the caller plus pinned
//! workers that spin before parking). Running these kernels on it instead was measured slower
//! (850 vs 660 ms per step of the default model on 2 busy cores): a pinned worker cannot move to
//! the free core when its own is taken by another process.

use rayon::prelude::*;

/// Threads the loops use.
pub fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// `f(i)` for `i` in `0..n`, spread over the pool; the results in order of `i`.
pub fn map<R: Send>(n: usize, f: impl Fn(usize) -> R + Sync + Send) -> Vec<R> {
    (0..n).into_par_iter().map(f).collect()
}

/// `f(i, chunk)` for the consecutive `len`-element chunks of `data` (the last may be shorter).
pub fn for_each_chunk<T: Send>(
    data: &mut [T],
    len: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    data.par_chunks_mut(len.max(1))
        .enumerate()
        .for_each(|(i, c)| f(i, c));
}

/// [`for_each_chunk`] collecting `f`'s results in chunk order.
pub fn map_chunks<T: Send, R: Send>(
    data: &mut [T],
    len: usize,
    f: impl Fn(usize, &mut [T]) -> R + Sync + Send,
) -> Vec<R> {
    data.par_chunks_mut(len.max(1))
        .enumerate()
        .map(|(i, c)| f(i, c))
        .collect()
}

/// `n` zeros, written by the pool: a kernel's output buffer without a single-threaded memset of
/// tens of MB (glibc zeroes reused heap blocks in `calloc` on the calling thread).
pub fn zeroed<T: Copy + Default + Send + Sync>(n: usize) -> Vec<T> {
    const CHUNK: usize = 1 << 15;
    if n < 8 * CHUNK {
        return vec![T::default(); n];
    }
    let mut v: Vec<T> = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(CHUNK)
        .for_each(|c| {
            for x in c {
                x.write(T::default());
            }
        });
    // SAFETY: the loop above initialised all of the first n elements.
    unsafe { v.set_len(n) };
    v
}
