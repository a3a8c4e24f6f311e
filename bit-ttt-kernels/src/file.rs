//! The packed file: one or more named ternary matrices, memory-mapped and read in place.
//!
//! Opening a [`PackedFile`] maps it and validates its header; the [`TernaryView`]s it hands out
//! point into the mapping, so loading copies no weights and allocates nothing the size of the
//! weights (only the small tensor table). The kernels then read the blocks where they lie.
//!
//! # Format, version 1 (all integers little-endian)
//!
//! | offset | size | field |
//! |--------|------|-------|
//! | 0      | 8    | magic `b"BTTTPACK"` |
//! | 8      | 4    | version, `u32` = 1 |
//! | 12     | 4    | tensor count `n`, `u32` |
//! | 16     | 48·n | tensor table, one entry per tensor (below) |
//!
//! A tensor entry (48 bytes):
//!
//! | offset | size | field |
//! |--------|------|-------|
//! | 0      | 8    | `name_offset`, `u64`: absolute file offset of the name (UTF-8, not empty) |
//! | 8      | 4    | `name_len`, `u32` |
//! | 12     | 4    | `scale`, `f32` bits: the per-tensor `gamma`, finite and > 0 |
//! | 16     | 8    | `rows`, `u64` (output features) |
//! | 24     | 8    | `cols`, `u64` (input features) |
//! | 32     | 8    | `data_offset`, `u64`: absolute offset of the blocks, a multiple of 32 |
//! | 40     | 8    | `data_len`, `u64` = `rows · ceil(cols / 128) · 32` |
//!
//! The blocks of a tensor are its [`BlockTernary`]s row after row, exactly the in-memory layout
//! described in [`packing`](crate::packing) (32 bytes each, `#[repr(C)]`, align 1). Data offsets
//! are 32-byte aligned so that, with the page-aligned mapping, every block is 32-byte aligned in
//! memory. [`write_packed_file`] puts the names after the table and the data after the names.
//!
//! Every field is checked on open: a file shorter than something its header describes gives
//! [`KernelError::Truncated`], a wrong magic [`KernelError::BadMagic`], other inconsistencies
//! [`KernelError::Malformed`]; never a panic. The 2-bit codes are not checked on open (that would
//! read every weight); call [`PackedFile::verify_codes`] for that.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::packing::{blocks_per_row, BlockTernary, TernaryView};
use crate::KernelError;

/// The first 8 bytes of a packed file.
pub const MAGIC: [u8; 8] = *b"BTTTPACK";
/// The format version this crate writes and reads.
pub const VERSION: u32 = 1;
/// Size of the fixed header before the tensor table.
pub const HEADER_LEN: usize = 16;
/// Size of one tensor-table entry.
pub const ENTRY_LEN: usize = 48;
/// Alignment of every tensor's block data in the file.
pub const DATA_ALIGN: usize = 32;

/// One tensor of the table, validated.
#[derive(Clone, Debug)]
struct Entry {
    name: String,
    rows: usize,
    cols: usize,
    scale: f32,
    offset: usize,
    len: usize,
}

/// A memory-mapped packed file; see the [module docs](self) for the format.
///
/// The file must not be modified or truncated while it is open (the usual caveat of memory
/// mapping: the operating system may then fault the process).
pub struct PackedFile {
    path: PathBuf,
    map: Option<Mmap>,
    entries: Vec<Entry>,
}

impl std::fmt::Debug for PackedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedFile")
            .field("path", &self.path)
            .field("file_len", &self.file_len())
            .field("tensors", &self.entries)
            .finish()
    }
}

fn io_error(path: &Path, e: std::io::Error) -> KernelError {
    KernelError::Io {
        path: path.to_path_buf(),
        kind: e.kind(),
        message: e.to_string(),
    }
}

impl PackedFile {
    /// Maps a packed file and validates its header and tensor table.
    ///
    /// # Errors
    /// [`KernelError::Io`] if it cannot be opened or mapped, [`KernelError::Truncated`] if it is
    /// shorter than its header says, [`KernelError::BadMagic`],
    /// [`KernelError::UnsupportedVersion`] or [`KernelError::Malformed`] for a bad header.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, KernelError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| io_error(path, e))?;
        let len = file.metadata().map_err(|e| io_error(path, e))?.len();
        if len < HEADER_LEN as u64 {
            return Err(KernelError::Truncated {
                path: path.to_path_buf(),
                what: "the header".into(),
                needed: HEADER_LEN as u64,
                len,
            });
        }
        // SAFETY: the mapping is read-only and private to this `PackedFile`; every view borrows
        // it. Memory-mapping is only sound if nobody modifies or truncates the file meanwhile,
        // which the type's documentation makes a condition of use.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| io_error(path, e))?;
        let entries = parse(&map, path)?;
        Ok(Self {
            path: path.to_path_buf(),
            map: Some(map),
            entries,
        })
    }

    fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The length of the file in bytes.
    pub fn file_len(&self) -> usize {
        self.bytes().len()
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the file holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The tensor names, in table order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.name.as_str())
    }

    fn view(&self, e: &Entry) -> TernaryView<'_> {
        let bytes = &self.bytes()[e.offset..e.offset + e.len];
        let blocks = BlockTernary::slice_from_bytes(bytes).expect("length checked on open");
        TernaryView::new(blocks, e.rows, e.cols, e.scale).expect("shape and scale checked on open")
    }

    /// The tensor called `name`, read in place.
    pub fn get(&self, name: &str) -> Option<TernaryView<'_>> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .map(|e| self.view(e))
    }

    /// All tensors with their names, in table order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, TernaryView<'_>)> {
        self.entries.iter().map(|e| (e.name.as_str(), self.view(e)))
    }

    /// The only tensor of a single-matrix file.
    ///
    /// # Errors
    /// [`KernelError::Malformed`] if the file does not hold exactly one tensor.
    pub fn single(&self) -> Result<TernaryView<'_>, KernelError> {
        match self.entries.as_slice() {
            [e] => Ok(self.view(e)),
            _ => Err(KernelError::Malformed {
                path: self.path.clone(),
                reason: format!("expected one tensor, found {}", self.entries.len()),
            }),
        }
    }

    /// Checks every weight of every tensor for the invalid code `0b11` (reads the whole file).
    ///
    /// # Errors
    /// [`KernelError::InvalidCode`] for the first bad weight.
    pub fn verify_codes(&self) -> Result<(), KernelError> {
        self.iter().try_for_each(|(_, v)| v.verify_codes())
    }
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn read_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Validates the header and table of `bytes` (a whole file) and returns the tensor entries.
fn parse(bytes: &[u8], path: &Path) -> Result<Vec<Entry>, KernelError> {
    let len = bytes.len() as u64;
    let truncated = |what: String, needed: u64| KernelError::Truncated {
        path: path.to_path_buf(),
        what,
        needed,
        len,
    };
    let malformed = |reason: String| KernelError::Malformed {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < HEADER_LEN {
        return Err(truncated("the header".into(), HEADER_LEN as u64));
    }
    if bytes[..8] != MAGIC {
        return Err(KernelError::BadMagic {
            path: path.to_path_buf(),
        });
    }
    let version = read_u32(bytes, 8);
    if version != VERSION {
        return Err(KernelError::UnsupportedVersion {
            path: path.to_path_buf(),
            version,
        });
    }
    let count = read_u32(bytes, 12) as u64;
    let table_end = HEADER_LEN as u64 + count * ENTRY_LEN as u64; // no overflow: count < 2^32
    if table_end > len {
        return Err(truncated(
            format!("the table of {count} tensors"),
            table_end,
        ));
    }
    let mut entries = Vec::with_capacity(count as usize);
    let mut seen = HashSet::new();
    for i in 0..count as usize {
        let e = &bytes[HEADER_LEN + i * ENTRY_LEN..HEADER_LEN + (i + 1) * ENTRY_LEN];
        let name_offset = read_u64(e, 0);
        let name_len = read_u32(e, 8) as u64;
        let scale = f32::from_bits(read_u32(e, 12));
        let (rows, cols) = (read_u64(e, 16), read_u64(e, 24));
        let (data_offset, data_len) = (read_u64(e, 32), read_u64(e, 40));

        let name_end = name_offset
            .checked_add(name_len)
            .ok_or_else(|| malformed(format!("tensor {i}: name offset overflows")))?;
        if name_end > len {
            return Err(truncated(format!("the name of tensor {i}"), name_end));
        }
        let name = std::str::from_utf8(&bytes[name_offset as usize..name_end as usize])
            .map_err(|_| malformed(format!("tensor {i}: name is not UTF-8")))?;
        if name.is_empty() {
            return Err(malformed(format!("tensor {i}: empty name")));
        }
        if !seen.insert(name) {
            return Err(malformed(format!("duplicate tensor name {name:?}")));
        }
        if !(scale.is_finite() && scale > 0.0) {
            return Err(malformed(format!("tensor {name:?}: invalid scale {scale}")));
        }
        let expected = usize::try_from(rows)
            .ok()
            .zip(usize::try_from(cols).ok())
            .and_then(|(r, c)| r.checked_mul(blocks_per_row(c))?.checked_mul(32))
            .ok_or_else(|| malformed(format!("tensor {name:?}: shape {rows}x{cols} overflows")))?;
        if data_len != expected as u64 {
            return Err(malformed(format!(
                "tensor {name:?}: {data_len} data bytes, a {rows}x{cols} matrix needs {expected}"
            )));
        }
        if !data_offset.is_multiple_of(DATA_ALIGN as u64) {
            return Err(malformed(format!(
                "tensor {name:?}: data offset {data_offset} is not a multiple of {DATA_ALIGN}"
            )));
        }
        let data_end = data_offset
            .checked_add(data_len)
            .ok_or_else(|| malformed(format!("tensor {name:?}: data offset overflows")))?;
        if data_end > len {
            return Err(truncated(
                format!("the blocks of tensor {name:?}"),
                data_end,
            ));
        }
        entries.push(Entry {
            name: name.to_owned(),
            rows: rows as usize,
            cols: cols as usize,
            scale,
            offset: data_offset as usize,
            len: data_len as usize,
        });
    }
    Ok(entries)
}

/// Writes named matrices as a packed file (see the [module docs](self) for the format).
///
/// # Errors
/// [`KernelError::Io`] if the file cannot be written, [`KernelError::Malformed`] for an empty,
/// duplicate or overlong name, or more than `u32::MAX` tensors.
pub fn write_packed_file(
    path: impl AsRef<Path>,
    tensors: &[(&str, TernaryView<'_>)],
) -> Result<(), KernelError> {
    let path = path.as_ref();
    let malformed = |reason: String| KernelError::Malformed {
        path: path.to_path_buf(),
        reason,
    };
    let count = u32::try_from(tensors.len())
        .map_err(|_| malformed(format!("{} tensors is too many", tensors.len())))?;
    let mut seen = HashSet::new();
    for (name, _) in tensors {
        if name.is_empty() || u32::try_from(name.len()).is_err() || !seen.insert(*name) {
            return Err(malformed(format!("bad or duplicate tensor name {name:?}")));
        }
    }
    let align = |x: usize| x.div_ceil(DATA_ALIGN) * DATA_ALIGN;
    let mut header = Vec::new();
    header.extend_from_slice(&MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    let mut name_offset = HEADER_LEN + ENTRY_LEN * tensors.len();
    let names_len: usize = tensors.iter().map(|(n, _)| n.len()).sum();
    let mut data_offset = align(name_offset + names_len);
    for (name, w) in tensors {
        header.extend_from_slice(&(name_offset as u64).to_le_bytes());
        header.extend_from_slice(&(name.len() as u32).to_le_bytes());
        header.extend_from_slice(&w.scale().to_bits().to_le_bytes());
        header.extend_from_slice(&(w.rows() as u64).to_le_bytes());
        header.extend_from_slice(&(w.cols() as u64).to_le_bytes());
        header.extend_from_slice(&(data_offset as u64).to_le_bytes());
        header.extend_from_slice(&(w.size_in_bytes() as u64).to_le_bytes());
        name_offset += name.len();
        data_offset = align(data_offset + w.size_in_bytes());
    }
    for (name, _) in tensors {
        header.extend_from_slice(name.as_bytes());
    }
    header.resize(align(header.len()), 0);

    let file = File::create(path).map_err(|e| io_error(path, e))?;
    let mut out = BufWriter::new(file);
    let mut written = header.len();
    out.write_all(&header).map_err(|e| io_error(path, e))?;
    for (_, w) in tensors {
        out.write_all(BlockTernary::slice_as_bytes(w.blocks()))
            .map_err(|e| io_error(path, e))?;
        written += w.size_in_bytes();
        let pad = align(written) - written;
        out.write_all(&[0u8; DATA_ALIGN][..pad])
            .map_err(|e| io_error(path, e))?;
        written += pad;
    }
    out.flush().map_err(|e| io_error(path, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PackedTernary;

    fn sample(rows: usize, cols: usize, seed: u64, scale: f32) -> PackedTernary {
        let mut s = seed;
        let values: Vec<i8> = (0..rows * cols)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) % 3) as i8 - 1
            })
            .collect();
        PackedTernary::pack(&values, rows, cols, scale).unwrap()
    }

    fn temp_path(tag: &str) -> PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::env::temp_dir().join(format!("bit-ttt-{tag}-{}-{n}.bttp", std::process::id()))
    }

    /// A file with three tensors, as bytes.
    fn sample_file() -> (Vec<u8>, Vec<PackedTernary>) {
        let ws = vec![
            sample(3, 200, 1, 0.5),
            sample(5, 128, 2, 2.0),
            sample(1, 1, 3, 1.0),
        ];
        let path = temp_path("sample");
        write_packed_file(
            &path,
            &[
                ("a.weight", ws[0].view()),
                ("b", ws[1].view()),
                ("c", ws[2].view()),
            ],
        )
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        (bytes, ws)
    }

    #[test]
    fn round_trip_reads_in_place() {
        let (bytes, ws) = sample_file();
        let path = temp_path("rt");
        std::fs::write(&path, &bytes).unwrap();
        let file = PackedFile::open(&path).unwrap();
        assert_eq!(file.len(), 3);
        assert_eq!(file.names().collect::<Vec<_>>(), ["a.weight", "b", "c"]);
        for ((name, view), w) in file.iter().zip(&ws) {
            assert_eq!(view.to_owned().unwrap(), *w, "{name}");
            // Zero-copy: the blocks lie inside the mapping, 32-byte aligned.
            let map = file.bytes().as_ptr_range();
            let p = view.blocks().as_ptr().cast::<u8>();
            assert!(map.contains(&p) && (p as usize).is_multiple_of(32));
        }
        assert_eq!(file.get("b").unwrap().scale(), 2.0);
        assert!(file.get("nope").is_none());
        assert!(file.single().is_err());
        file.verify_codes().unwrap();
        drop(file);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn every_truncation_is_an_error() {
        let (bytes, _) = sample_file();
        assert!(parse(&bytes, Path::new("x")).is_ok());
        for cut in 0..bytes.len() {
            let err = parse(&bytes[..cut], Path::new("x")).unwrap_err();
            assert!(
                matches!(err, KernelError::Truncated { .. }),
                "cut at {cut}: {err}"
            );
        }
    }

    #[test]
    fn truncated_file_on_disk_is_an_error() {
        let (bytes, _) = sample_file();
        for cut in [0, 10, HEADER_LEN + 5, bytes.len() - 1] {
            let path = temp_path("cut");
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let err = PackedFile::open(&path).unwrap_err();
            std::fs::remove_file(&path).unwrap();
            assert!(
                matches!(err, KernelError::Truncated { .. }),
                "cut at {cut}: {err}"
            );
            assert!(err.to_string().contains("truncated"), "{err}");
        }
    }

    #[test]
    fn corrupt_headers_are_errors() {
        let (bytes, _) = sample_file();
        let p = Path::new("x");
        let patched = |at: usize, new: &[u8]| {
            let mut b = bytes.clone();
            b[at..at + new.len()].copy_from_slice(new);
            b
        };
        let e0 = HEADER_LEN; // first table entry
        assert!(matches!(
            parse(&patched(0, b"GGUF"), p),
            Err(KernelError::BadMagic { .. })
        ));
        assert!(matches!(
            parse(&patched(8, &2u32.to_le_bytes()), p),
            Err(KernelError::UnsupportedVersion { version: 2, .. })
        ));
        // Huge tensor count: the table runs past the end.
        assert!(matches!(
            parse(&patched(12, &u32::MAX.to_le_bytes()), p),
            Err(KernelError::Truncated { .. })
        ));
        // Name offset near u64::MAX.
        assert!(matches!(
            parse(&patched(e0, &(u64::MAX - 1).to_le_bytes()), p),
            Err(KernelError::Malformed { .. })
        ));
        // Misaligned data offset, overflowing data offset, wrong data length, shape overflow.
        let data_offset = read_u64(&bytes, e0 + 32);
        for (at, new) in [
            (e0 + 32, (data_offset + 1).to_le_bytes()),
            (e0 + 32, (u64::MAX - 31).to_le_bytes()),
            (e0 + 40, 32u64.to_le_bytes()),
            (e0 + 16, u64::MAX.to_le_bytes()),
        ] {
            assert!(matches!(
                parse(&patched(at, &new), p),
                Err(KernelError::Malformed { .. })
            ));
        }
        // Bad scale, duplicate name (both entries point at the same name).
        assert!(matches!(
            parse(&patched(e0 + 12, &f32::NAN.to_bits().to_le_bytes()), p),
            Err(KernelError::Malformed { .. })
        ));
        let first_name = read_u64(&bytes, e0);
        let mut dup = patched(e0 + ENTRY_LEN, &first_name.to_le_bytes());
        dup[e0 + ENTRY_LEN + 8..e0 + ENTRY_LEN + 12].copy_from_slice(&8u32.to_le_bytes());
        assert!(matches!(parse(&dup, p), Err(KernelError::Malformed { .. })));
    }

    #[test]
    fn invalid_codes_are_found_by_verify() {
        let w = sample(2, 130, 7, 1.0);
        let path = temp_path("codes");
        write_packed_file(&path, &[("w", w.view())]).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let data = read_u64(&bytes, HEADER_LEN + 32) as usize;
        bytes[data + 2 * 32 + 3] |= 0b11 << 2; // row 1, block 0, weight 3 + 32
        std::fs::write(&path, &bytes).unwrap();
        let file = PackedFile::open(&path).unwrap();
        assert_eq!(
            file.verify_codes(),
            Err(KernelError::InvalidCode { row: 1, col: 35 })
        );
        assert_eq!(file.single().unwrap().rows(), 2);
        drop(file);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn missing_file_is_an_io_error() {
        let err = PackedFile::open(temp_path("missing")).unwrap_err();
        assert!(matches!(
            err,
            KernelError::Io {
                kind: std::io::ErrorKind::NotFound,
                ..
            }
        ));
    }
}
