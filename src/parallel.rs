//! Data parallelism on candle's CPU worker pool. candle's matmuls already run there; putting our
//! kernels and attention on the same spinning workers keeps a second pool (rayon) from waking up
//! and competing for the same cores on every small decode-step operation.

use std::sync::atomic::{AtomicUsize, Ordering};

struct SendPtr<T>(*mut T);
// SAFETY: only used to hand disjoint sub-slices of one `&mut [T]` to the pool's threads.
unsafe impl<T: Send> Sync for SendPtr<T> {}
unsafe impl<T: Send> Send for SendPtr<T> {}

/// Calls `f(i, piece)` for every `chunk`-sized piece of `out` (the last may be shorter), spread
/// over the pool; pieces are claimed one at a time so uneven work balances.
pub fn par_chunks_mut<T: Send>(out: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let chunk = chunk.max(1);
    let n_chunks = out.len().div_ceil(chunk);
    if n_chunks <= 1 {
        if !out.is_empty() {
            f(0, out);
        }
        return;
    }
    let len = out.len();
    let base = SendPtr(out.as_mut_ptr());
    let next = AtomicUsize::new(0);
    candle_core::utils::barrier_pool().execute(|_| {
        let base = &base;
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n_chunks {
                break;
            }
            let start = i * chunk;
            let end = (start + chunk).min(len);
            // SAFETY: each index is claimed by exactly one thread, so the pieces never overlap,
            // and `out` outlives `execute`, which returns only after every worker is done.
            let piece = unsafe { std::slice::from_raw_parts_mut(base.0.add(start), end - start) };
            f(i, piece);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_piece_once() {
        let mut v = vec![0u32; 1003];
        par_chunks_mut(&mut v, 10, |i, p| {
            for x in p.iter_mut() {
                *x += i as u32 + 1;
            }
        });
        for (j, x) in v.iter().enumerate() {
            assert_eq!(*x, (j / 10) as u32 + 1);
        }
    }
}
