//! The CPU matmuls' activation rounding on the GPU (`kernels/cuda/matmul.cu`): candle's Q4_1 and
//! Q5_0 weights in device memory times inputs of a few rows (decode), the inputs quantized to
//! 8-bit blocks with f32 scales as [`super::quantize_block`] does. candle's MMVQ rounds the
//! block scales to f16, which moved SmolLM2's GPU perplexity ~1% off the CPU's; longer inputs
//! (prefill) stay with candle's MMQ, where speed matters more than matching the CPU bit for bit.

use anyhow::Result;
use candle_core::Tensor;
use candle_core::cuda_backend::CudaDevice;
use candle_core::quantized::QMatMul;
use cudarc::driver::{CudaFunction, PushKernelArg};

use super::{Kind, QK};
use crate::gpu::{Input, cuda, launch_cfg, scratch, tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/matmul.ptx"));
/// Most input rows taken here.
const MAX_ROWS: usize = 8;
/// matmul.cu's `Q8`: two f32 scales and 32 bytes.
const Q8_BYTES: usize = 8 + QK;
const WARPS: usize = 8;

/// `DH_CUDA_CANDLE_MATVEC=1` leaves these types to candle's MMVQ too (a diagnosis knob: the
/// before/after of this module in one run).
fn candle_only() -> bool {
    static ONLY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ONLY.get_or_init(|| std::env::var_os("DH_CUDA_CANDLE_MATVEC").is_some())
}

fn func(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    crate::gpu::func(dev, "dhurandhar_matmul", PTX, name)
}

/// `x` [t, cols] · `w`ᵀ → [t, rows] when `w` is a Q4_1 or Q5_0 matrix on the GPU and t ≤
/// [`MAX_ROWS`]; `None` otherwise (the caller runs candle's matmul).
pub fn forward(w: &QMatMul, x: &Tensor) -> Result<Option<Tensor>> {
    let QMatMul::QTensor(q) = w else {
        return Ok(None);
    };
    let (Some(kind), Ok((t, cols))) = (Kind::of(q.dtype()), x.dims2()) else {
        return Ok(None);
    };
    let (rows, w_cols) = q.shape().dims2()?;
    if t > MAX_ROWS
        || candle_only()
        || !x.device().is_cuda()
        || cols != w_cols
        || !cols.is_multiple_of(QK)
    {
        return Ok(None);
    }
    let dev = cuda(x)?;
    let stream = dev.cuda_stream();
    let x = x.contiguous()?;
    let xi = Input::of(&x)?;
    let nb = cols / QK;
    let n_blocks = t * nb;
    // SAFETY: every block is written by q8_quantize before quant_matvec reads it.
    let mut qx = unsafe { stream.alloc::<u8>(n_blocks * Q8_BYTES) }?;
    {
        let f = func(&dev, "q8_quantize")?;
        let mut b = stream.launch_builder(&f);
        let xv = xi.view()?;
        let n_i = n_blocks as i32;
        b.arg(&xv).arg(&mut qx).arg(&n_i);
        let grid = n_blocks.div_ceil(WARPS) as u32;
        // SAFETY: argument types and order match `q8_quantize`; x holds n_blocks · 32 values,
        // qx n_blocks blocks.
        unsafe { b.launch(launch_cfg((grid, 1), (32 * WARPS) as u32)) }?;
    }
    let mut y = scratch(&dev, t * rows)?;
    let (w_ptr, guard) = q.device_ptr_with_guard(&stream)?;
    let w_addr = w_ptr as u64;
    let f = func(&dev, "quant_matvec")?;
    let mut b = stream.launch_builder(&f);
    let (rows_i, nb_i) = (rows as i32, nb as i32);
    let kind_i: i32 = match kind {
        Kind::Q4_1 => 0,
        Kind::Q5_0 => 1,
    };
    b.arg(&w_addr)
        .arg(&qx)
        .arg(&mut y)
        .arg(&rows_i)
        .arg(&nb_i)
        .arg(&kind_i);
    let grid = (rows.div_ceil(WARPS) as u32, t as u32);
    // SAFETY: argument types and order match `quant_matvec`; w holds rows · nb blocks of
    // `kind`, qx t · nb blocks, y t · rows values.
    unsafe { b.launch(launch_cfg(grid, (32 * WARPS) as u32)) }?;
    drop((guard, xi));
    Ok(Some(tensor(&dev, y, &[t, rows])))
}
