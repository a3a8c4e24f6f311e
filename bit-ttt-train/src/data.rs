//! Text files in, token streams out: reading (with clear errors), tokenizing, and the
//! deterministic train/validation split.

use std::path::{Path, PathBuf};

use crate::tokenizer::Tokenizer;
use crate::TrainError;

/// Reads a UTF-8 text file.
///
/// # Errors
/// [`TrainError::MissingFile`], [`TrainError::EmptyFile`] (also for whitespace only),
/// [`TrainError::NotUtf8`] or [`TrainError::Io`].
pub fn read_text(path: &Path) -> Result<String, TrainError> {
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => TrainError::MissingFile(path.to_path_buf()),
        _ => TrainError::io(path, e),
    })?;
    let text = String::from_utf8(bytes).map_err(|e| TrainError::NotUtf8 {
        path: path.to_path_buf(),
        offset: e.utf8_error().valid_up_to(),
    })?;
    if text.trim().is_empty() {
        return Err(TrainError::EmptyFile(path.to_path_buf()));
    }
    Ok(text)
}

/// Reads every file of `paths` (at least one).
///
/// # Errors
/// See [`read_text`]; [`TrainError::InvalidSetting`] if `paths` is empty.
pub fn read_texts(paths: &[PathBuf]) -> Result<Vec<String>, TrainError> {
    if paths.is_empty() {
        return Err(TrainError::InvalidSetting(
            "no data files given (--data FILE...)".into(),
        ));
    }
    paths.iter().map(|p| read_text(p)).collect()
}

/// Train and validation token streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// The first `1 - valid_fraction` of the token stream.
    pub train: Vec<u32>,
    /// The last `valid_fraction` of the token stream.
    pub valid: Vec<u32>,
}

/// Tokenizes `texts` one after the other into one stream and cuts it: the last
/// `valid_fraction` of the tokens are the validation split. Deterministic.
///
/// # Errors
/// [`TrainError::InvalidSetting`] if `valid_fraction` is not in (0, 1), and tokenizer errors.
pub fn tokenize_and_split(
    tokenizer: &Tokenizer,
    texts: &[String],
    valid_fraction: f64,
) -> Result<Split, TrainError> {
    if !(valid_fraction > 0.0 && valid_fraction < 1.0) {
        return Err(TrainError::InvalidSetting(format!(
            "--valid-fraction must be in (0, 1), got {valid_fraction}"
        )));
    }
    let mut stream = Vec::new();
    for text in texts {
        stream.extend(tokenizer.encode(text)?);
    }
    let n_valid = ((stream.len() as f64) * valid_fraction).round() as usize;
    let valid = stream.split_off(stream.len() - n_valid);
    Ok(Split {
        train: stream,
        valid,
    })
}

/// Checks a split can feed sequences of `seq_len` tokens (plus the next-token target).
///
/// # Errors
/// [`TrainError::NotEnoughData`] naming the short split.
pub fn check_length(split: &Split, seq_len: usize) -> Result<(), TrainError> {
    if seq_len == 0 {
        return Err(TrainError::InvalidSetting(
            "--seq-len must be at least 1".into(),
        ));
    }
    for (name, tokens) in [("train", &split.train), ("validation", &split.valid)] {
        if tokens.len() < seq_len + 1 {
            return Err(TrainError::NotEnoughData {
                split: name,
                tokens: tokens.len(),
                seq_len,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.txt");
        assert!(matches!(
            read_text(&missing),
            Err(TrainError::MissingFile(_))
        ));
        let empty = dir.path().join("empty.txt");
        std::fs::write(&empty, " \n").unwrap();
        assert!(matches!(read_text(&empty), Err(TrainError::EmptyFile(_))));
        let latin1 = dir.path().join("latin1.txt");
        std::fs::write(&latin1, b"caf\xe9 au lait").unwrap();
        let err = read_text(&latin1).unwrap_err();
        assert!(
            matches!(err, TrainError::NotUtf8 { offset: 3, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("not UTF-8"));
        assert!(read_texts(&[]).is_err());
    }
}
