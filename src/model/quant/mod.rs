//! Hand-written CPU matmuls for weight types whose candle kernels are scalar (Q4_1, Q5_0).
//! Activations are quantized to 8 bits once per row (as ggml does); weights are read straight
//! from the memory map; AVX2 integer dot products with a portable fallback.

#[cfg(feature = "cuda")]
pub mod device;
mod kernels;

use std::sync::Arc;

use anyhow::{Result, bail};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};

use crate::model::gguf::GgufFile;
use crate::parallel::{SharedMut, par_for};

const QK: usize = 32;
/// Parallel tasks per pool thread: long contiguous row ranges keep the hardware prefetcher
/// streaming (decode is bound by reading the weights), a few per thread still balance.
const TASKS_PER_THREAD: usize = 2;
/// From this many input rows on, unpacking a weight row once beats decoding it per input.
const UNPACK_MIN_M: usize = 4;

/// One activation block: scale, scale × Σq (for the weights' offset term), 32 signed bytes.
#[derive(Clone, Copy)]
pub struct Q8Block {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; QK],
}

/// Weight types this module handles itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Q4_1,
    Q5_0,
}

impl Kind {
    pub fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_1 => Some(Kind::Q4_1),
            GgmlDType::Q5_0 => Some(Kind::Q5_0),
            _ => None,
        }
    }

    fn block_bytes(self) -> usize {
        match self {
            Kind::Q4_1 => kernels::Q4_1_BYTES,
            Kind::Q5_0 => kernels::Q5_0_BYTES,
        }
    }

    fn kernel(self) -> kernels::DotFn {
        match self {
            Kind::Q4_1 => kernels::q4_1(),
            Kind::Q5_0 => kernels::q5_0(),
        }
    }

    fn unpack(self, w: &[u8], out: &mut [kernels::Unpacked]) {
        match self {
            Kind::Q4_1 => kernels::unpack_q4_1(w, out),
            Kind::Q5_0 => kernels::unpack_q5_0(w, out),
        }
    }
}

pub struct QuantMatrix {
    file: Arc<GgufFile>,
    offset: usize,
    kind: Kind,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
}

impl QuantMatrix {
    pub fn new(
        file: Arc<GgufFile>,
        offset: usize,
        kind: Kind,
        rows: usize,
        cols: usize,
    ) -> Result<Self> {
        if !cols.is_multiple_of(QK) {
            bail!("{kind:?} matrix with {cols} columns (not a multiple of {QK})");
        }
        Ok(Self {
            file,
            offset,
            kind,
            rows,
            cols,
        })
    }

    fn row(&self, r: usize) -> &[u8] {
        let rb = self.cols / QK * self.kind.block_bytes();
        let start = self.offset + r * rb;
        &self.file.mmap[start..start + rb]
    }

    /// `x` [m, cols] → [m, rows]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        if k != self.cols {
            bail!(
                "{:?} matmul: input has {k} features, weights expect {}",
                self.kind,
                self.cols
            );
        }
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let nb = k / QK;
        let qx: Vec<Q8Block> = xs.chunks_exact(QK).map(quantize_block).collect();
        let n = self.rows;
        let dot = self.kind.kernel();
        let dot_unpacked = kernels::unpacked();
        let mut y = vec![0f32; m * n];
        let out = SharedMut::new(&mut y);
        // Each task owns a range of weight rows, i.e. the same column range of every output row.
        let threads = candle_core::utils::get_num_threads();
        let rows_per_task = n.div_ceil(threads * TASKS_PER_THREAD).max(4);
        par_for(n.div_ceil(rows_per_task), |tile| {
            let rows = tile * rows_per_task..((tile + 1) * rows_per_task).min(n);
            let x_row = |i: usize| &qx[i * nb..(i + 1) * nb];
            // SAFETY: tasks own disjoint column ranges, so these output ranges never overlap.
            let out_row = |i: usize| unsafe { out.range(i * n + rows.start..i * n + rows.end) };
            if m < UNPACK_MIN_M {
                for i in 0..m {
                    for (o, r) in out_row(i).iter_mut().zip(rows.clone()) {
                        *o = dot(self.row(r), x_row(i));
                    }
                }
                return;
            }
            // Several inputs: unpack the task's weight rows once, then plain byte dot products.
            let mut unpacked = vec![kernels::Unpacked::default(); rows.len() * nb];
            for (u, r) in unpacked.chunks_exact_mut(nb).zip(rows.clone()) {
                self.kind.unpack(self.row(r), u);
            }
            for i in 0..m {
                for (o, u) in out_row(i).iter_mut().zip(unpacked.chunks_exact(nb)) {
                    *o = dot_unpacked(u, x_row(i));
                }
            }
        });
        Ok(Tensor::from_vec(y, (m, n), &Device::Cpu)?)
    }
}

pub fn quantize_block(b: &[f32]) -> Q8Block {
    let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK];
    let mut sum = 0i32;
    for (q, v) in qs.iter_mut().zip(b) {
        *q = (v * id).round() as i8;
        sum += *q as i32;
    }
    Q8Block {
        d,
        s: d * sum as f32,
        qs,
    }
}
