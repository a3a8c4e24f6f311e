//! Helpers shared by the command line's test files.
#![allow(dead_code)] // each test file uses its own share

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bit-ttt-train"))
}

pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("the binary runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs and expects failure with `needle` in stderr, and no panic.
pub fn fails_with(args: &[&str], needle: &str) {
    let o = run(args);
    let err = stderr(&o);
    assert!(!o.status.success(), "{args:?} succeeded:\n{}", stdout(&o));
    assert!(
        err.contains(needle),
        "{args:?}: expected {needle:?} in stderr:\n{err}"
    );
    assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
}

/// A small English-like corpus (about 12 kB).
pub fn corpus(dir: &Path) -> PathBuf {
    let words = [
        "the", "whale", "sea", "ship", "captain", "white", "boat", "harpoon", "deck", "wind",
        "and", "of", "a", "to", "in", "was", "his", "he", "it", "with",
    ];
    let mut x: u64 = 3;
    let mut text = String::new();
    for i in 0..2400 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        text.push_str(words[(x >> 59) as usize % words.len()]);
        text.push(if i % 11 == 10 { '\n' } else { ' ' });
    }
    let path = dir.join("corpus.txt");
    std::fs::write(&path, text).unwrap();
    path
}

pub const TINY: &[&str] = &[
    "--mixer",
    "ttt_linear",
    "--preset",
    "tiny",
    "--seq-len",
    "16",
    "--batch-size",
    "4",
    "--vocab-size",
    "300",
    "--eval-every",
    "2",
    "--eval-batches",
    "2",
    "--progress",
    "quiet",
];

/// The tensors of a safetensors file: name → (header entry, bytes), metadata left out.
pub fn tensors(path: &Path) -> std::collections::BTreeMap<String, (serde_json::Value, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    header
        .into_iter()
        .filter(|(name, _)| name != "__metadata__")
        .map(|(name, entry)| {
            let offsets = &entry["data_offsets"];
            let (start, end) = (
                offsets[0].as_u64().unwrap() as usize,
                offsets[1].as_u64().unwrap() as usize,
            );
            let values = data[start..end].to_vec();
            (name, (entry, values))
        })
        .collect()
}

/// Trains a tokenizer of 300 tokens on `data` into `out`.
pub fn train_tokenizer(data: &str, out: &str) -> Output {
    let o = run(&[
        "tokenizer",
        "--data",
        data,
        "--vocab-size",
        "300",
        "--out",
        out,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    o
}
