//! Named f32 tensors in a safetensors file: read (f32, f16 or bf16 on disk) and written
//! atomically (a temporary file in the same folder, fsync, rename, fsync of the folder), so that
//! a reader or a crash never sees half a file.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use safetensors::{Dtype, SafeTensors, View};

use crate::error::{Result, invalid, io};

/// A dense f32 tensor in row-major order.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// The dimensions.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values.
    pub data: Vec<f32>,
}

impl Tensor {
    /// A tensor; `data` must hold `shape.iter().product()` values.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        Self { shape, data }
    }

    /// The number of values the shape holds.
    pub fn element_count(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A borrowed f32 tensor as safetensors serialises it.
struct F32View<'a> {
    shape: &'a [usize],
    bytes: Vec<u8>,
}

impl View for &F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }

    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// The bytes of a safetensors file holding `tensors` (f32) and the `metadata` strings.
pub fn serialize(tensors: &BTreeMap<String, Tensor>, metadata: Option<HashMap<String, String>>) -> Result<Vec<u8>> {
    let views: Vec<(String, F32View<'_>)> = tensors
        .iter()
        .map(|(name, tensor)| {
            let bytes = tensor.data.iter().flat_map(|value| value.to_le_bytes()).collect();
            (name.clone(), F32View { shape: &tensor.shape, bytes })
        })
        .collect();
    safetensors::serialize(views.iter().map(|(name, view)| (name.as_str(), view)), metadata)
        .map_err(|error| invalid(Path::new("<memory>"), format!("cannot serialise tensors: {error}")))
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsync, rename over `path`,
/// fsync of the folder.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let folder = path.parent().filter(|parent| !parent.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
    let temporary = folder.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&temporary).map_err(|cause| io(&temporary, cause))?;
        file.write_all(bytes).map_err(|cause| io(&temporary, cause))?;
        file.sync_all().map_err(|cause| io(&temporary, cause))?;
        drop(file);
        std::fs::rename(&temporary, path).map_err(|cause| io(path, cause))?;
        // The rename is durable once the folder's entry is on disk.
        if let Ok(directory) = std::fs::File::open(folder) {
            let _ = directory.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result
}

/// Writes `tensors` (f32) and `metadata` to a safetensors file, atomically.
pub fn write(path: &Path, tensors: &BTreeMap<String, Tensor>, metadata: Option<HashMap<String, String>>) -> Result<()> {
    write_atomically(path, &serialize(tensors, metadata)?)
}

/// Every tensor of a safetensors file, converted to f32 (f32, f16 and bf16 are read), and its
/// metadata strings.
pub fn read(path: &Path) -> Result<(BTreeMap<String, Tensor>, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|cause| io(path, cause))?;
    let file =
        SafeTensors::deserialize(&bytes).map_err(|error| invalid(path, format!("not a safetensors file: {error}")))?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|error| invalid(path, format!("not a safetensors file: {error}")))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let mut tensors = BTreeMap::new();
    for (name, view) in file.tensors() {
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => {
                return Err(invalid(path, format!("tensor `{name}` has dtype {other:?} (expected f32, f16 or bf16)")));
            }
        };
        tensors.insert(name, Tensor::new(view.shape().to_vec(), values));
    }
    Ok((tensors, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_and_metadata_round_trip_bit_for_bit() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("t.safetensors");
        let mut tensors = BTreeMap::new();
        tensors.insert("a".to_owned(), Tensor::new(vec![2, 3], vec![0.1, -0.0, f32::MIN_POSITIVE, 1e30, -7.5, 3.0]));
        tensors.insert("b".to_owned(), Tensor::new(vec![1], vec![42.0]));
        let metadata = HashMap::from([("step".to_owned(), "7".to_owned())]);
        write(&path, &tensors, Some(metadata.clone())).unwrap();
        let (read_back, read_metadata) = read(&path).unwrap();
        assert_eq!(read_back, tensors);
        assert_eq!(read_metadata, metadata);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(folder.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_file_that_is_not_safetensors_is_an_error_naming_it() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("bad.safetensors");
        std::fs::write(&path, b"hello").unwrap();
        let error = read(&path).unwrap_err().to_string();
        assert!(error.contains("bad.safetensors") && error.contains("not a safetensors file"), "{error}");
    }
}
