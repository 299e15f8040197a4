//! Our own CUDA kernels on candle's device (`--features cuda`): modules of PTX loaded once per
//! device, contiguous f32 tensors read in place, outputs handed back as tensors.

use anyhow::{Result, bail};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use candle_core::cuda_backend::{CudaDevice, CudaStorage, DeviceId};
use candle_core::op::BackpropOp;
use candle_core::{DType, Device, Storage, StorageRef, Tensor};
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaFunction, CudaSlice, CudaView, LaunchConfig};

pub fn cuda(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        _ => bail!("expected a tensor on the GPU"),
    }
}

/// A contiguous f32 tensor's storage, held while a kernel reads it.
pub struct Input<'a> {
    storage: StorageRef<'a>,
    start: usize,
    len: usize,
}

impl<'a> Input<'a> {
    pub fn of(t: &'a Tensor) -> Result<Self> {
        if t.dtype() != DType::F32 {
            bail!("our GPU kernels take f32 tensors, got {:?}", t.dtype());
        }
        let (storage, layout) = t.storage_and_layout();
        if !layout.is_contiguous() {
            bail!("our GPU kernels take contiguous tensors");
        }
        Ok(Self {
            storage,
            start: layout.start_offset(),
            len: layout.shape().elem_count(),
        })
    }

    /// Values held.
    pub fn values(&self) -> usize {
        self.len
    }

    pub fn view(&self) -> Result<CudaView<'_, f32>> {
        match &*self.storage {
            Storage::Cuda(c) => Ok(c
                .as_cuda_slice::<f32>()?
                .slice(self.start..self.start + self.len)),
            _ => bail!("expected a tensor on the GPU"),
        }
    }
}

pub fn tensor(dev: &CudaDevice, slice: CudaSlice<f32>, shape: &[usize]) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

pub fn launch_cfg(grid: (u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Dynamic shared memory any of our kernels may ask for.
pub const MAX_DYNAMIC_SHARED: usize = 64 << 10;

/// Kernel `name` of the PTX module `module` on `dev`, looked up once per device.
pub fn func(dev: &CudaDevice, module: &str, ptx: &'static str, name: &str) -> Result<CudaFunction> {
    type Table = HashMap<(DeviceId, String), CudaFunction>;
    static FUNCS: OnceLock<Mutex<Table>> = OnceLock::new();
    let mut table = FUNCS
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| anyhow::anyhow!("CUDA kernel table poisoned"))?;
    let key = (dev.id(), name.to_string());
    if let Some(f) = table.get(&key) {
        return Ok(f.clone());
    }
    let f = dev
        .get_or_load_custom_func(name, module, ptx)?
        .into_cuda_function();
    // Above 48 KiB of dynamic shared memory a kernel must opt in (the decode kernels stage
    // slices of the cache there); every GPU we build for (sm_80 and later) allows this much.
    f.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        MAX_DYNAMIC_SHARED as i32,
    )?;
    table.insert(key, f.clone());
    Ok(f)
}

/// Device memory for `n` values that the kernel about to run writes in full before anything
/// reads them (no zero-fill launch).
pub fn scratch(dev: &CudaDevice, n: usize) -> Result<CudaSlice<f32>> {
    // SAFETY: every caller passes the buffer to a kernel that writes all `n` values first.
    Ok(unsafe { dev.cuda_stream().alloc::<f32>(n.max(1)) }?)
}
