//! Steps of the forward pass fused into one GPU launch each (`kernels/cuda/ops.cu`): a decode
//! step on the GPU is bound by launches, not by these steps' memory traffic.

use anyhow::Result;
use candle_core::Tensor;
use candle_core::cuda_backend::CudaDevice;
use cudarc::driver::{CudaFunction, PushKernelArg};

use super::activation::Activation;
use crate::gpu::{Input, cuda, launch_cfg, scratch, tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ops.ptx"));

fn func(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    crate::gpu::func(dev, "dhurandhar_ops", PTX, name)
}

/// `gu` [t, 2f] (gate and up joined) → act(gate) · up [t, f].
pub fn glu(gu: &Tensor, act: Activation) -> Result<Tensor> {
    let dev = cuda(gu)?;
    let (t, f2) = gu.dims2()?;
    let f = f2 / 2;
    let gu = gu.contiguous()?;
    let gi = Input::of(&gu)?;
    let n = t * f;
    let mut y = scratch(&dev, n)?;
    let k = func(&dev, "glu")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&k);
    let gv = gi.view()?;
    let (f_i, n_i) = (f as i32, n as i64);
    let act_i: i32 = match act {
        Activation::Silu => 0,
        Activation::GeluTanh => 1,
    };
    b.arg(&gv).arg(&mut y).arg(&f_i).arg(&n_i).arg(&act_i);
    let blocks = n.div_ceil(256).min(65535) as u32;
    // SAFETY: argument types and order match `glu`; y holds t · f values.
    unsafe { b.launch(launch_cfg((blocks, 1), 256)) }?;
    drop(gi);
    Ok(tensor(&dev, y, &[t, f]))
}

/// `x`, `h` [t, n] → (`x + h`, RMS norm of `x + h` scaled by `w` [n]).
pub fn add_rms_norm(x: &Tensor, h: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    let dev = cuda(x)?;
    let (t, n) = x.dims2()?;
    let (x, h) = (x.contiguous()?, h.contiguous()?);
    let (xi, hi, wi) = (Input::of(&x)?, Input::of(&h)?, Input::of(w)?);
    let mut s = scratch(&dev, t * n)?;
    let mut y = scratch(&dev, t * n)?;
    let k = func(&dev, "add_rms_norm")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&k);
    let (xv, hv, wv) = (xi.view()?, hi.view()?, wi.view()?);
    let n_i = n as i32;
    b.arg(&xv)
        .arg(&hv)
        .arg(&wv)
        .arg(&mut s)
        .arg(&mut y)
        .arg(&n_i)
        .arg(&eps);
    // SAFETY: argument types and order match `add_rms_norm`; s and y hold t · n values.
    unsafe { b.launch(launch_cfg((t as u32, 1), 1024)) }?;
    drop((xi, hi, wi));
    Ok((tensor(&dev, s, &[t, n]), tensor(&dev, y, &[t, n])))
}
