//! Data parallelism on candle's CPU worker pool. candle's matmuls already run there; putting our
//! kernels and attention on the same spinning workers keeps a second pool (rayon) from waking up
//! and competing for the same cores on every small decode-step operation.

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Runs `f(task)` for `task` in `0..n_tasks` over the pool; tasks are claimed one at a time so
/// uneven work balances.
pub fn par_for(n_tasks: usize, f: impl Fn(usize) + Sync) {
    if n_tasks <= 1 {
        if n_tasks == 1 {
            f(0);
        }
        return;
    }
    let next = AtomicUsize::new(0);
    candle_core::utils::barrier_pool().execute(|_| {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n_tasks {
                break;
            }
            f(i);
        }
    });
}

/// A slice that parallel tasks write through, each task to ranges no other task touches.
pub struct SharedMut<'a, T> {
    ptr: *mut T,
    len: usize,
    _slice: PhantomData<&'a mut [T]>,
}

// SAFETY: access goes through `range`, whose contract is that concurrent ranges are disjoint.
unsafe impl<T: Send> Sync for SharedMut<'_, T> {}

impl<'a, T> SharedMut<'a, T> {
    pub fn new(s: &'a mut [T]) -> Self {
        Self {
            ptr: s.as_mut_ptr(),
            len: s.len(),
            _slice: PhantomData,
        }
    }

    /// # Safety
    /// No other live reference (from any thread) may overlap `r`.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn range(&self, r: Range<usize>) -> &mut [T] {
        assert!(
            r.start <= r.end && r.end <= self.len,
            "range {r:?} outside {}",
            self.len
        );
        // SAFETY: in bounds (checked), disjoint from other live ranges (caller's contract).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(r.start), r.len()) }
    }
}

/// Calls `f(i, piece)` for every `chunk`-sized piece of `out` (the last may be shorter).
pub fn par_chunks_mut<T: Send>(out: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let chunk = chunk.max(1);
    let len = out.len();
    let shared = SharedMut::new(out);
    par_for(len.div_ceil(chunk), |i| {
        let start = i * chunk;
        // SAFETY: piece i is handed to exactly one task.
        let piece = unsafe { shared.range(start..(start + chunk).min(len)) };
        f(i, piece);
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
