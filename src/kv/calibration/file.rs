//! Saving and reading a calibration: a safetensors file beside the model, tagged with the
//! weights' fingerprint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use super::*;

/// Format tag of saved calibrations; a file with another tag is measured again.
const FILE_FORMAT: &str = "dhurandhar-kv-calibration-2";

impl KvCalibration {
    /// Where a model's calibration is kept: beside a model file (`M.gguf.kv-calibration`), or
    /// inside a model directory.
    pub fn path_for(model: &Path) -> PathBuf {
        if model.is_dir() {
            model.join("kv-calibration.safetensors")
        } else {
            let mut name = model.as_os_str().to_owned();
            name.push(".kv-calibration.safetensors");
            PathBuf::from(name)
        }
    }

    /// Writes means, spectra and moments as safetensors: per layer `k.{il}.mean` [n_kv, d],
    /// `k.{il}.eigenvalues` [n_kv, d], `k.{il}.vt` [n_kv, d, d], and the same for `v`;
    /// `k.{il}.moments` [n_kv·d/2, 5] and `q.{il}.moments` [n_kv·d/2, 3] (f64), `v.{il}.var`
    /// [n_kv, d]; `fingerprint` (the model's) goes in the metadata. Written beside `path` and
    /// renamed over it, so a reader never sees half a file.
    pub fn save(&self, path: &Path, fingerprint: &str) -> Result<()> {
        let mut bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        let f32s = |v: &[f32]| bytemuck::cast_slice::<f32, u8>(v).to_vec();
        for (kv, means, spectra) in [
            ("k", &self.k_mean, &self.k_spectra),
            ("v", &self.v_mean, &self.v_spectra),
        ] {
            for (il, mean) in means.iter().enumerate() {
                bufs.push((
                    format!("{kv}.{il}.mean"),
                    Dtype::F32,
                    vec![mean.len()],
                    f32s(mean),
                ));
                let Some(specs) = spectra.get(il).filter(|s| !s.is_empty()) else {
                    continue;
                };
                let (h, d) = (specs.len(), specs[0].eigenvalues.len());
                let eig: Vec<f32> = specs.iter().flat_map(|s| s.eigenvalues.clone()).collect();
                let vt: Vec<f32> = specs.iter().flat_map(|s| s.vt.iter().copied()).collect();
                bufs.push((
                    format!("{kv}.{il}.eigenvalues"),
                    Dtype::F32,
                    vec![h, d],
                    f32s(&eig),
                ));
                bufs.push((
                    format!("{kv}.{il}.vt"),
                    Dtype::F32,
                    vec![h, d, d],
                    f32s(&vt),
                ));
            }
        }
        for (il, m) in self.moments.iter().enumerate() {
            let Some(m) = m else { continue };
            for (name, width, flat) in [
                ("k", 5, m.k.iter().flatten().copied().collect::<Vec<f64>>()),
                ("q", 3, m.q.iter().flatten().copied().collect()),
            ] {
                if !flat.is_empty() {
                    let shape = vec![flat.len() / width, width];
                    let bytes = bytemuck::cast_slice::<f64, u8>(&flat).to_vec();
                    bufs.push((format!("{name}.{il}.moments"), Dtype::F64, shape, bytes));
                }
            }
        }
        for (il, var) in self.v_var.iter().enumerate() {
            if !var.is_empty() {
                bufs.push((
                    format!("v.{il}.var"),
                    Dtype::F32,
                    vec![var.len()],
                    f32s(var),
                ));
            }
        }
        let views = bufs
            .iter()
            .map(|(name, dtype, shape, data)| {
                Ok((name.clone(), TensorView::new(*dtype, shape.clone(), data)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let meta = HashMap::from([
            ("format".to_string(), FILE_FORMAT.to_string()),
            ("fingerprint".to_string(), fingerprint.to_string()),
            ("tokens".to_string(), self.tokens.to_string()),
            ("layers".to_string(), self.k_mean.len().to_string()),
        ]);
        // Unique per writer, so two loads saving at once each rename a whole file.
        static WRITES: AtomicUsize = AtomicUsize::new(0);
        let n = WRITES.fetch_add(1, Ordering::Relaxed);
        let mut partial = path.as_os_str().to_owned();
        partial.push(format!(".{}-{n}.partial", std::process::id()));
        let partial = PathBuf::from(partial);
        safetensors::serialize_to_file(views, Some(meta), &partial)
            .with_context(|| format!("writing {}", partial.display()))?;
        std::fs::rename(&partial, path).with_context(|| format!("writing {}", path.display()))
    }

    /// Reads a file [`save`](Self::save) wrote for the model with `fingerprint`; `None` when it
    /// was written for another model or format (the caller measures again). K's centre and
    /// weights are left for [`serve`](Self::serve).
    pub fn load(path: &Path, fingerprint: &str) -> Result<Option<Self>> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let st = SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{} is not a safetensors file", path.display()))?;
        let (_, header) = SafeTensors::read_metadata(&bytes)?;
        let meta = header.metadata().clone().unwrap_or_default();
        let get = |k: &str| meta.get(k).map(String::as_str);
        if get("format") != Some(FILE_FORMAT) || get("fingerprint") != Some(fingerprint) {
            return Ok(None);
        }
        let layers: usize = get("layers").unwrap_or("0").parse()?;
        let tokens: usize = get("tokens").unwrap_or("0").parse()?;
        let tensor = |name: &str, dtype: Dtype| -> Result<Option<(Vec<usize>, &[u8])>> {
            match st.tensor(name) {
                Ok(t) if t.dtype() != dtype => {
                    bail!("{}: {name} is not {dtype:?}", path.display())
                }
                Ok(t) => Ok(Some((t.shape().to_vec(), t.data()))),
                Err(_) => Ok(None),
            }
        };
        let floats = |name: &str| -> Result<Option<(Vec<usize>, Vec<f32>)>> {
            Ok(tensor(name, Dtype::F32)?.map(|(shape, data)| {
                let v = data.chunks_exact(4);
                (
                    shape,
                    v.map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                )
            }))
        };
        let moments = |name: &str, width: usize| -> Result<Vec<f64>> {
            let Some((shape, data)) = tensor(name, Dtype::F64)? else {
                return Ok(Vec::new());
            };
            if shape.len() != 2 || shape[1] != width {
                bail!("{}: {name} has shape {shape:?}", path.display());
            }
            let v = data.chunks_exact(8);
            Ok(v.map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect())
        };
        let mut out = Self::empty(tokens);
        for kv in ["k", "v"] {
            for il in 0..layers {
                let Some((_, mean)) = floats(&format!("{kv}.{il}.mean"))? else {
                    bail!("{}: no {kv} mean for layer {il}", path.display());
                };
                let specs = match (
                    floats(&format!("{kv}.{il}.eigenvalues"))?,
                    floats(&format!("{kv}.{il}.vt"))?,
                ) {
                    (Some((shape, eig)), Some((_, vt))) if shape.len() == 2 => {
                        let (h, d) = (shape[0], shape[1]);
                        if mean.len() != h * d || eig.len() != h * d || vt.len() != h * d * d {
                            bail!(
                                "{}: layer {il} {kv} tensors disagree in shape",
                                path.display()
                            );
                        }
                        (0..h)
                            .map(|i| Spectrum {
                                eigenvalues: eig[i * d..(i + 1) * d].to_vec(),
                                vt: Arc::new(vt[i * d * d..(i + 1) * d * d].to_vec()),
                            })
                            .collect()
                    }
                    // Layers that store no K/V (shared-KV tails) have no spectra.
                    _ => Vec::new(),
                };
                let (means, spectra) = if kv == "k" {
                    (&mut out.k_mean, &mut out.k_spectra)
                } else {
                    (&mut out.v_mean, &mut out.v_spectra)
                };
                means.push(mean);
                spectra.push(specs);
            }
        }
        for il in 0..layers {
            let k = moments(&format!("k.{il}.moments"), 5)?;
            let q = moments(&format!("q.{il}.moments"), 3)?;
            if !q.is_empty() && q.len() / 3 != k.len() / 5 {
                bail!(
                    "{}: layer {il} K and query moments disagree",
                    path.display()
                );
            }
            out.moments.push((!k.is_empty()).then(|| PairMoments {
                k: k.chunks_exact(5).map(|c| c.try_into().unwrap()).collect(),
                q: q.chunks_exact(3).map(|c| c.try_into().unwrap()).collect(),
            }));
            let var = floats(&format!("v.{il}.var"))?;
            out.v_var.push(var.map(|(_, v)| v).unwrap_or_default());
        }
        Ok(Some(out))
    }
}

/// Identifies a model's weights for a saved calibration: name and size of the file, or of every
/// file in the directory.
pub fn fingerprint(model: &Path) -> String {
    let entry = |p: &Path| {
        let len = std::fs::metadata(p).map_or(0, |m| m.len());
        format!(
            "{}:{len}",
            p.file_name().unwrap_or_default().to_string_lossy()
        )
    };
    if model.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(model)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.retain(|p| {
            p.extension()
                .is_some_and(|e| e == "safetensors" || e == "json")
        });
        files.retain(|p| !p.ends_with("kv-calibration.safetensors"));
        files.sort();
        files.iter().map(|p| entry(p)).collect::<Vec<_>>().join(",")
    } else {
        entry(model)
    }
}
