//! Token embeddings: dense, or read row by row from the weights' bytes (the map, or a private
//! copy), decoding only the rows asked for.

use std::sync::Arc;

use anyhow::{Result, bail};
use candle_core::quantized::GgmlDType;
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K,
    BlockQ8_0, GgmlType,
};
use candle_core::{Device, Tensor};

use super::gguf::GgufFile;

/// Token embeddings. Tables read by rows stay in the map (or a private copy with
/// `--ple resident`) and only the rows asked for are decoded.
pub enum Embedding {
    Dense(Tensor),
    Rows {
        bytes: RowBytes,
        /// Where row 0 starts in `bytes`.
        offset: usize,
        rows: usize,
        cols: usize,
        format: RowFormat,
        device: Device,
    },
}

/// The bytes an embedding's rows are read from.
pub enum RowBytes {
    Gguf(Arc<GgufFile>),
    Map(Arc<memmap2::Mmap>),
    Owned(Vec<u8>),
}

impl RowBytes {
    fn bytes(&self) -> &[u8] {
        match self {
            RowBytes::Gguf(g) => &g.mmap,
            RowBytes::Map(m) => m,
            RowBytes::Owned(v) => v,
        }
    }
}

#[derive(Clone, Copy)]
pub enum RowFormat {
    Ggml(GgmlDType),
    F32,
    F16,
    Bf16,
}

impl RowFormat {
    fn row_bytes(self, cols: usize) -> usize {
        match self {
            RowFormat::Ggml(d) => cols / d.block_size() * d.type_size(),
            RowFormat::F32 => 4 * cols,
            RowFormat::F16 | RowFormat::Bf16 => 2 * cols,
        }
    }

    fn decode(self, src: &[u8], dst: &mut [f32]) -> Result<()> {
        match self {
            RowFormat::Ggml(d) => dequantize_row(d, src, dst)?,
            RowFormat::F32 => {
                for (d, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
                    *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            RowFormat::F16 => {
                for (d, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            RowFormat::Bf16 => {
                for (d, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
        }
        Ok(())
    }
}

impl Embedding {
    fn n_rows(&self) -> usize {
        match self {
            Embedding::Dense(t) => t.dims()[0],
            Embedding::Rows { rows, .. } => *rows,
        }
    }

    /// Bytes of the table as stored.
    pub fn table_bytes(&self) -> usize {
        match self {
            Embedding::Dense(t) => t.elem_count() * 4,
            Embedding::Rows {
                rows, cols, format, ..
            } => rows * format.row_bytes(*cols),
        }
    }

    /// The same table copied out of the map into memory of its own (every page read now).
    pub fn into_resident(self) -> Self {
        match self {
            Embedding::Rows {
                bytes,
                offset,
                rows,
                cols,
                format,
                device,
            } => {
                let len = rows * format.row_bytes(cols);
                let copy = bytes.bytes()[offset..offset + len].to_vec();
                Embedding::Rows {
                    bytes: RowBytes::Owned(copy),
                    offset: 0,
                    rows,
                    cols,
                    format,
                    device,
                }
            }
            dense => dense,
        }
    }

    /// Bytes of the table present in this process's memory now (`/proc/self/pagemap`), and the
    /// table's size. None where the kernel does not say.
    pub fn resident_bytes(&self) -> Option<(usize, usize)> {
        let Embedding::Rows {
            bytes,
            offset,
            rows,
            cols,
            format,
            ..
        } = self
        else {
            return None;
        };
        let len = rows * format.row_bytes(*cols);
        let start = bytes.bytes()[*offset..].as_ptr() as usize;
        Some((pages_present(start, len)?, len))
    }

    /// Tells the kernel rows are read in no particular order (no readahead of the table).
    pub fn advise_random(&self) {
        #[cfg(unix)]
        if let Embedding::Rows {
            bytes: RowBytes::Map(m),
            ..
        } = self
        {
            let _ = m.advise(memmap2::Advice::Random);
        }
    }

    /// `ids` [t] → [t, hidden]
    pub fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        let n = self.n_rows();
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= n) {
            bail!("token id {bad} is outside the vocabulary of {n}");
        }
        match self {
            Embedding::Dense(t) => {
                let idx = Tensor::new(ids, t.device())?;
                Ok(t.index_select(&idx, 0)?)
            }
            Embedding::Rows {
                bytes,
                offset,
                cols,
                format,
                device,
                ..
            } => {
                let row_bytes = format.row_bytes(*cols);
                let data = bytes.bytes();
                let mut out = vec![0f32; ids.len() * cols];
                for (i, &id) in ids.iter().enumerate() {
                    let start = offset + id as usize * row_bytes;
                    format.decode(
                        &data[start..start + row_bytes],
                        &mut out[i * cols..(i + 1) * cols],
                    )?;
                }
                Ok(Tensor::from_vec(out, (ids.len(), *cols), device)?)
            }
        }
    }
}

/// Bytes of `[start, start+len)` whose pages are present in this process (bit 63 of each
/// `/proc/self/pagemap` entry).
fn pages_present(start: usize, len: usize) -> Option<usize> {
    use std::io::{Read, Seek, SeekFrom};
    const PAGE: usize = 4096;
    let first = start / PAGE;
    let last = (start + len).div_ceil(PAGE);
    let mut f = std::fs::File::open("/proc/self/pagemap").ok()?;
    f.seek(SeekFrom::Start((first * 8) as u64)).ok()?;
    let mut present = 0;
    let mut buf = vec![0u8; 8 * 4096];
    let mut left = last - first;
    while left > 0 {
        let n = left.min(4096);
        f.read_exact(&mut buf[..n * 8]).ok()?;
        present += buf[..n * 8]
            .chunks_exact(8)
            .filter(|e| e[7] & 0x80 != 0)
            .count();
        left -= n;
    }
    Some((present * PAGE).min(len))
}

fn blocks<T: GgmlType>(src: &[u8], dst: &mut [f32]) {
    // SAFETY: ggml blocks are plain-old-data; GGUF aligns tensor data to 32 bytes and rows hold
    // whole blocks, so the cast is aligned and in bounds.
    let xs = unsafe {
        std::slice::from_raw_parts(
            src.as_ptr() as *const T,
            src.len() / std::mem::size_of::<T>(),
        )
    };
    T::to_float(xs, dst);
}

/// Dequantizes one row of ggml blocks.
pub fn dequantize_row(dtype: GgmlDType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    match dtype {
        GgmlDType::F32 => dst.copy_from_slice(bytemuck::cast_slice(src)),
        GgmlDType::F16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = half::f16::from_le_bytes([s[0], s[1]]).to_f32();
            }
        }
        GgmlDType::BF16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = half::bf16::from_le_bytes([s[0], s[1]]).to_f32();
            }
        }
        GgmlDType::Q4_0 => blocks::<BlockQ4_0>(src, dst),
        GgmlDType::Q4_1 => blocks::<BlockQ4_1>(src, dst),
        GgmlDType::Q5_0 => blocks::<BlockQ5_0>(src, dst),
        GgmlDType::Q5_1 => blocks::<BlockQ5_1>(src, dst),
        GgmlDType::Q8_0 => blocks::<BlockQ8_0>(src, dst),
        GgmlDType::Q2K => blocks::<BlockQ2K>(src, dst),
        GgmlDType::Q3K => blocks::<BlockQ3K>(src, dst),
        GgmlDType::Q4K => blocks::<BlockQ4K>(src, dst),
        GgmlDType::Q5K => blocks::<BlockQ5K>(src, dst),
        GgmlDType::Q6K => blocks::<BlockQ6K>(src, dst),
        other => bail!("cannot read embedding rows of type {other:?}"),
    }
    Ok(())
}
