//! The binary end to end: every bad input is a clear error with a non-zero exit (never a
//! panic), and a small run trains, stops, resumes, evaluates and generates.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Output};

#[test]
fn bad_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let good = corpus(dir.path()).to_string_lossy().into_owned();
    std::fs::write(d("empty.txt"), "").unwrap();
    std::fs::write(d("latin1.txt"), b"na\xefve caf\xe9").unwrap();
    let out = d("run");

    let train = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["train", "--out", &out].map(String::from).to_vec();
        a.extend(TINY.iter().map(|s| s.to_string()));
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let check = |args: Vec<String>, needle: &str| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_with(&refs, needle);
    };

    check(train(&["--data", &d("missing.txt")]), "does not exist");
    check(train(&["--data", &d("empty.txt")]), "is empty");
    check(train(&["--data", &d("latin1.txt")]), "not UTF-8");
    check(
        train(&["--data", &good, "--vocab-size", "100"]),
        "too small",
    );
    check(
        train(&["--data", &good, "--seq-len", "100000"]),
        "too few for sequences of 100000 tokens",
    );
    check(
        train(&["--data", &good, "--device", "tpu"]),
        "invalid value 'tpu'",
    );
    check(
        train(&["--data", &good, "--mixer", "lstm"]),
        "unknown mixer",
    );
    check(
        train(&["--data", &good, "--preset", "huge"]),
        "unknown preset",
    );
    check(train(&["--data", &good, "--lr", "0"]), "learning rates");
    if !cfg!(feature = "wgpu") {
        check(
            train(&["--data", &good, "--device", "wgpu"]),
            "not compiled into this binary",
        );
    }
    check(
        train(&["--data", &good, "--resume", "--out", &d("nothing")]),
        "holds no checkpoint",
    );
    fails_with(
        &[
            "tokenizer",
            "--data",
            &d("latin1.txt"),
            "--out",
            &d("t.json"),
        ],
        "not UTF-8",
    );
    fails_with(
        &["eval", "--model", &d("no-model"), "--data", &good],
        "tokenizer.json",
    );
    fails_with(&["export", "--model", &d("no-model")], "missing file");
    fails_with(
        &[
            "generate",
            "--model",
            &d("no-model"),
            "--prompt",
            "x",
            "--tokenizer",
            &d("t.json"),
        ],
        "does not exist",
    );
    // Splits between GPU and CPU: asked for on the CPU backend, badly spelt, half given.
    let generate = |extra: &[&str]| {
        let mut a = vec!["generate", "--model", "no-model", "--prompt", "x"];
        a.extend(extra);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    check(generate(&["--n-gpu-layers", "2"]), "add --device wgpu");
    check(
        generate(&["--n-gpu-layers", "lots"]),
        "neither a number of blocks nor `auto`",
    );
    check(
        generate(&["--gpu-memory", "8GiB"]),
        "only applies with --n-gpu-layers auto",
    );
    check(
        generate(&["--n-gpu-layers", "auto", "--gpu-memory", "8 parsecs"]),
        "unknown unit",
    );
    fails_with(&["bench", "--n-gpu-layers", "1"], "add --device wgpu");
    fails_with(&["bench", "--gpu-memory", "1GiB"], "go with --n-gpu-layers");
    // Sizes are bounded before anything is allocated.
    check(
        train(&["--data", &good, "--d-model", "100000000"]),
        "weights in its matrices",
    );
    // The machine's memory is read from /proc/meminfo.
    if cfg!(target_os = "linux") {
        check(
            train(&["--data", &good, "--d-model", "65536", "--n-heads", "4"]),
            "to train it needs about",
        );
    }
    // A tokenizer is not a data file.
    check(
        train(&["--data", &good, "--tokenizer", &d("no-tokenizer.json")]),
        "tokenizer file",
    );
    // No run directory was left half-made by the failures: a fresh start still works.
    assert!(!dir.path().join("run").exists());
}

/// `demo` checks its data and flags before it deletes or writes anything in `--out`, and a
/// small budget runs it end to end (tokenizer, baselines, training, evaluation, sample).
#[test]
fn demo_validates_first_and_runs_on_a_small_budget() {
    let dir = tempfile::tempdir().unwrap();
    let good = corpus(dir.path()).to_string_lossy().into_owned();
    let few = dir.path().join("few.txt");
    std::fs::write(&few, "Call me Ishmael. Some years ago.").unwrap();
    let few = few.to_string_lossy().into_owned();
    let out = dir.path().join("run");
    let out_s = out.to_string_lossy().into_owned();
    // What an earlier demo left: a checkpoint directory with something in it.
    let marker = out.join("checkpoints").join("step-000200").join("keep");
    std::fs::create_dir_all(marker.parent().unwrap()).unwrap();
    std::fs::write(&marker, "earlier run").unwrap();
    let demo = |extra: &[&str]| {
        let mut a = vec!["demo", "--out", &out_s, "--vocab-size", "300"];
        a.extend(extra);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let fails = |args: Vec<String>, needle: &str| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_with(&refs, needle);
        assert!(marker.exists(), "{args:?} deleted the earlier checkpoints");
        assert!(
            !out.join("tokenizer.json").exists(),
            "{args:?} wrote a tokenizer"
        );
    };
    fails(
        demo(&["--data", &few]),
        "too few for sequences of 256 tokens",
    );
    fails(
        demo(&["--data", &good, "--prompt", ""]),
        "--prompt must not be empty",
    );
    fails(demo(&["--data", &good, "--steps", "0"]), "--steps");
    fails(demo(&["--data", &good, "--vocab-size", "100"]), "too small");
    let elsewhere = dir.path().join("nothing").to_string_lossy().into_owned();
    fails_with(
        &["demo", "--out", &elsewhere, "--resume"],
        "holds no checkpoint",
    );

    let o = run(
        &demo(&["--data", &good, "--steps", "2", "--sample-tokens", "5"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let text = stdout(&o);
    assert!(o.status.success(), "{text}\n{}", stderr(&o));
    for step in ["[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"] {
        assert!(text.contains(step), "no {step} in:\n{text}");
    }
    // The model's cross-entropy is printed beside the baselines, as a finite number.
    let row = text
        .lines()
        .find(|l| l.contains("BitLlama, ternary ttt_linear"))
        .unwrap_or_else(|| panic!("no model row in:\n{text}"));
    let ce: f64 = row
        .split_whitespace()
        .rev()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(ce.is_finite() && ce > 0.0, "{row}");
    // Cross-entropy by position, in windows of the training length and of four times it.
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            l.starts_with("256 tokens, model") || l.starts_with("1024 tokens, model")
        })
        .collect();
    assert_eq!(rows.len(), 2, "no by-position rows in:\n{text}");
    assert_eq!(text.matches("tokens, bigram").count(), 2, "{text}");
    // 256 tokens: buckets 0–16, 16–64, 64–256, no 256+, then all; 1024 tokens: all five.
    assert_eq!(
        rows[0].split_whitespace().filter(|w| *w == "-").count(),
        1,
        "{}",
        rows[0]
    );
    let all: Vec<f64> = rows
        .iter()
        .map(|r| r.split_whitespace().last().unwrap().parse().unwrap())
        .collect();
    assert!(
        (all[0] - ce).abs() < 5e-4,
        "windows of the training length: {} vs {ce}",
        all[0]
    );
    let cost = text
        .lines()
        .find(|l| l.contains("windows of 1024 tokens cost"))
        .unwrap_or_else(|| panic!("no cost line in:\n{text}"));
    // The printed means are rounded to 3 decimals, the printed cost is the rounded difference
    // of the unrounded means: they agree within one unit of the last decimal and its rounding.
    let printed_cost: f64 = cost
        .split("cost ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no number in: {cost}"));
    assert!(
        (printed_cost - (all[1] - all[0])).abs() < 1.5e-3,
        "{cost} vs {} − {}",
        all[1],
        all[0]
    );
    // A fresh demo replaced the earlier checkpoints with its own.
    assert!(!marker.exists());
    assert!(out.join("checkpoints").join("step-000002").is_dir());
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "metrics.csv",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }

    // A resume takes the run's own step count; another one needs --extend.
    let resume = |extra: &[&str]| {
        let mut a = vec![
            "demo",
            "--out",
            &out_s,
            "--data",
            &good,
            "--resume",
            "--sample-tokens",
            "3",
        ];
        a.extend(extra);
        run(&a)
    };
    let o = resume(&[]);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    fails_with(
        &[
            "demo", "--out", &out_s, "--data", &good, "--resume", "--steps", "4",
        ],
        "--extend",
    );
    let o = resume(&["--steps", "4", "--extend"]);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    assert!(out.join("checkpoints").join("step-000004").is_dir());
}

#[test]
fn train_stop_resume_eval_generate() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path()).to_string_lossy().into_owned();
    let out = dir.path().join("run");
    let out_s = out.to_string_lossy().into_owned();

    // A separate tokenizer, then a run that uses it and stops at step 3 of 6.
    let tok = dir.path().join("tok.json").to_string_lossy().into_owned();
    let o = train_tokenizer(&data, &tok);
    assert!(stdout(&o).contains("bytes/token"));

    let mut args = vec![
        "train",
        "--out",
        &out_s,
        "--data",
        &data,
        "--tokenizer",
        &tok,
    ];
    args.extend(TINY);
    args.extend(["--steps", "6", "--stop-at", "3", "--checkpoint-every", "2"]);
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("stopped at step 3 of 6"),
        "{}",
        stdout(&o)
    );
    // Starting again on the same directory without --resume is refused.
    fails_with(&args, "already holds a training run");

    let o = run(&["train", "--out", &out_s, "--resume", "--progress", "quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("done: 6 steps"), "{}", stdout(&o));
    for file in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "metrics.csv",
        "loss.png",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 7, "{csv}");
    assert!(std::fs::read_to_string(out.join("checkpoints/latest")).unwrap() == "step-000006");

    let o = run(&[
        "eval",
        "--model",
        &out_s,
        "--data",
        &data,
        "--seq-len",
        "16",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("perplexity"), "{}", stdout(&o));
    // A checkpoint directory is a model directory too; its tokenizer is the run's.
    let ckpt = out
        .join("checkpoints/step-000006")
        .to_string_lossy()
        .into_owned();
    let o = run(&["eval", "--model", &ckpt, "--data", &data, "--seq-len", "16"]);
    assert!(o.status.success(), "{}", stderr(&o));

    let o = run(&[
        "generate",
        "--model",
        &out_s,
        "--prompt",
        "the whale",
        "--max-tokens",
        "10",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("the whale"), "{}", stdout(&o));

    // export: the packed inference file, reloaded by memory map, gives the model's logits.
    let packed = dir.path().join("model.packed.safetensors");
    let o = run(&[
        "export",
        "--model",
        &out_s,
        "--out",
        &packed.to_string_lossy(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report = stdout(&o);
    let diff: f32 = report
        .split("max logit difference ")
        .nth(1)
        .and_then(|rest| rest.trim().parse().ok())
        .unwrap_or_else(|| panic!("no logit difference in: {report}"));
    assert!(diff <= 1e-4, "{report}");
    let weights = std::fs::metadata(out.join("model.safetensors"))
        .unwrap()
        .len();
    let packed_len = std::fs::metadata(&packed).unwrap().len();
    assert!(
        packed_len < weights,
        "packed file ({packed_len} bytes) not smaller than the f32 weights ({weights} bytes)"
    );
    // Exporting over the model's own weights is refused, and the weights stay as they were.
    let weights_path = out.join("model.safetensors");
    let before = std::fs::read(&weights_path).unwrap();
    fails_with(
        &[
            "export",
            "--model",
            &out_s,
            "--out",
            &weights_path.to_string_lossy(),
        ],
        "the model's own model.safetensors",
    );
    assert_eq!(std::fs::read(&weights_path).unwrap(), before);
    for (flag, value, needle) in [
        ("--top-p", "0", "top_p"),
        ("--top-p", "1.5", "top_p must be in (0, 1], got 1.5"),
        ("--top-p", "NaN", "top_p must be in (0, 1], got NaN"),
        (
            "--temperature",
            "NaN",
            "temperature must be a finite number",
        ),
    ] {
        fails_with(
            &["generate", "--model", &out_s, "--prompt", "x", flag, value],
            needle,
        );
    }
}

#[test]
fn resume_refuses_changed_settings_unless_extended() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path()).to_string_lossy().into_owned();
    let out = dir.path().join("run").to_string_lossy().into_owned();
    let mut args = vec!["train", "--out", &out, "--data", &data];
    args.extend(TINY);
    args.extend(["--steps", "4", "--stop-at", "2"]);
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));

    let resume = ["train", "--out", &out, "--resume", "--progress", "quiet"];
    let with = |extra: &[&'static str]| [&resume[..], extra].concat();
    fails_with(
        &with(&["--lr", "0.001"]),
        "--lr 0.001 differs from the run's 0.003; pass --extend to apply it",
    );
    // A typed value counts even when it is the default: the run was not started with it.
    fails_with(
        &with(&["--steps", "1000"]),
        "--steps 1000 differs from the run's 4",
    );
    fails_with(
        &with(&["--extend", "--seq-len", "32", "--d-model", "32"]),
        "--d-model 32 differs from the run's 64; --seq-len 32 differs from the run's 16; a resumed run cannot change these",
    );
    fails_with(&["train", "--out", &out, "--extend"], "--resume");

    // The original command again, with --resume --extend and more steps: the flags typed with
    // their old values are no change, --steps is applied.
    let mut again = args[..args.len() - 4].to_vec();
    again.extend(["--resume", "--extend", "--steps", "5"]);
    let o = run(&again);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("done: 5 steps"), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("--vocab-size is ignored"),
        "{}",
        stderr(&o)
    );
}

/// The cross-entropy `eval` prints (`cross-entropy X nats/token`).
fn cross_entropy(o: &Output) -> f64 {
    let out = stdout(o);
    out.split("cross-entropy ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no cross-entropy in: {out}\n{}", stderr(o)))
}

/// `generate` and `eval` read the packed file `export` writes (memory-mapped) as they read the
/// model directory: the same text for the same seed (both decode with the fused decoder, over
/// the same ternary codes), and the same cross-entropy within 1e-4 nats/token (the packed
/// logits equal the training-mode ones; 1e-4 is `export`'s logit tolerance and the precision
/// `eval` prints).
#[test]
fn generate_and_eval_read_a_packed_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path()).to_string_lossy().into_owned();
    let out = dir.path().join("run");
    let out_s = out.to_string_lossy().into_owned();
    let mut args = vec!["train", "--out", &out_s, "--data", &data];
    args.extend(TINY);
    args.extend(["--steps", "4"]);
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));

    // The default output: inside the model directory, next to its tokenizer.
    let o = run(&["export", "--model", &out_s]);
    assert!(o.status.success(), "{}", stderr(&o));
    let packed = out.join("model.packed.safetensors");
    assert!(packed.is_file(), "{}", stdout(&o));
    let packed_s = packed.to_string_lossy().into_owned();

    for sampling in [
        &["--seed", "7"][..],
        &["--seed", "8", "--temperature", "1.2", "--top-k", "0"],
        &["--temperature", "0"],
    ] {
        let generate = |model: &str| {
            let mut a = vec![
                "generate",
                "--model",
                model,
                "--prompt",
                "the whale",
                "--max-tokens",
                "24",
            ];
            a.extend(sampling);
            let o = run(&a);
            assert!(o.status.success(), "{a:?}: {}", stderr(&o));
            stdout(&o)
        };
        let (from_dir, from_packed) = (generate(&out_s), generate(&packed_s));
        assert!(from_dir.starts_with("the whale"), "{from_dir}");
        assert!(
            from_dir.trim_end().len() > "the whale".len(),
            "{sampling:?}: nothing generated: {from_dir}"
        );
        assert_eq!(from_packed, from_dir, "{sampling:?}");
    }

    let eval = |model: &str| {
        let o = run(&["eval", "--model", model, "--data", &data, "--seq-len", "16"]);
        assert!(o.status.success(), "{}", stderr(&o));
        cross_entropy(&o)
    };
    let (from_dir, from_packed) = (eval(&out_s), eval(&packed_s));
    assert!(from_dir.is_finite() && from_dir > 0.0, "{from_dir}");
    assert!(
        (from_dir - from_packed).abs() <= 1e-4,
        "directory {from_dir}, packed file {from_packed}"
    );

    // A packed file away from its tokenizer: a clear error, or the tokenizer given by hand.
    let alone_dir = dir.path().join("elsewhere");
    std::fs::create_dir(&alone_dir).unwrap();
    let alone = alone_dir.join("m.packed.safetensors");
    std::fs::copy(&packed, &alone).unwrap();
    let alone_s = alone.to_string_lossy().into_owned();
    fails_with(
        &["generate", "--model", &alone_s, "--prompt", "x"],
        "no tokenizer.json next to",
    );
    let tok = out.join("tokenizer.json").to_string_lossy().into_owned();
    let o = run(&[
        "generate",
        "--model",
        &alone_s,
        "--tokenizer",
        &tok,
        "--prompt",
        "the whale",
        "--max-tokens",
        "24",
        "--seed",
        "7",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("the whale"), "{}", stdout(&o));

    // A path that is neither a directory nor a file, and a file that is not a packed model.
    let nothing = dir.path().join("nothing").to_string_lossy().into_owned();
    for command in ["generate", "eval"] {
        let mut a = vec![command, "--model", &nothing, "--tokenizer", &tok];
        a.extend(if command == "generate" {
            ["--prompt", "x"]
        } else {
            ["--data", data.as_str()]
        });
        fails_with(&a, "no model at");
    }
    fails_with(
        &[
            "eval",
            "--model",
            &data,
            "--tokenizer",
            &tok,
            "--data",
            &data,
        ],
        "corrupt file",
    );
    fails_with(
        &["export", "--model", &packed_s],
        "export reads a model directory",
    );
}

#[test]
fn divergence_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path()).to_string_lossy().into_owned();
    let out = dir.path().join("run").to_string_lossy().into_owned();
    let mut args = vec!["train", "--out", &out, "--data", &data];
    args.extend(TINY);
    args.extend([
        "--steps",
        "30",
        "--lr",
        "1e30",
        "--min-lr",
        "1e30",
        "--warmup-steps",
        "0",
        "--checkpoint-every",
        "1",
    ]);
    fails_with(&args, "training diverged");
    let again = dir.path().join("again").to_string_lossy().into_owned();
    args[2] = &again;
    let o = run(&args);
    assert!(
        stderr(&o).contains("The last good checkpoint is"),
        "{}",
        stderr(&o)
    );
}

#[cfg(unix)]
#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_cleanly() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path()).to_string_lossy().into_owned();
    let out = dir.path().join("run");
    let out_s = out.to_string_lossy().into_owned();
    let mut args = vec!["train", "--out", &out_s, "--data", &data];
    args.extend(TINY);
    args.extend(["--steps", "100000", "--eval-every", "1"]);
    let child = bin()
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // metrics.csv appears after the first evaluation: training is under way.
    let started = Instant::now();
    let mut child = child;
    while !out.join("metrics.csv").exists() {
        if let Some(status) = child.try_wait().unwrap() {
            let o = child.wait_with_output().unwrap();
            panic!("exited early with {status}: {}", stderr(&o));
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "training never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(stderr(&o).contains("Ctrl-C"), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("continue with --resume"),
        "{}",
        stdout(&o)
    );
    assert!(out.join("checkpoints/latest").is_file());
    assert!(!stderr(&o).contains("panicked"));
}

/// Training stopped at step 3 and resumed in another process ends where an uninterrupted run
/// ends, bit for bit: the same losses at every step and the same final weights, for every mixer.
#[test]
fn a_resume_in_another_process_repeats_an_uninterrupted_run_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path()).to_string_lossy().into_owned();
    let tok = dir.path().join("tok.json").to_string_lossy().into_owned();
    train_tokenizer(&data, &tok);
    // TINY without its mixer.
    let tiny: Vec<&str> = TINY
        .chunks(2)
        .filter(|pair| pair[0] != "--mixer")
        .flatten()
        .copied()
        .collect();
    // (step, train_loss, val_loss) of every step, as the final checkpoint records them.
    let losses = |out: &Path| -> Vec<(u64, f64, Option<f64>)> {
        let state: serde_json::Value = serde_json::from_slice(
            &std::fs::read(out.join("checkpoints/step-000006/trainer_state.json")).unwrap(),
        )
        .unwrap();
        state["metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["step"].as_u64().unwrap(),
                    m["train_loss"].as_f64().unwrap(),
                    m["val_loss"].as_f64(),
                )
            })
            .collect()
    };
    for mixer in ["ttt_linear", "ttt_mlp", "attention"] {
        let train = |out: &Path, extra: &[&str]| {
            let out_s = out.to_string_lossy().into_owned();
            let mut args = vec![
                "train",
                "--out",
                &out_s,
                "--data",
                &data,
                "--tokenizer",
                &tok,
            ];
            args.extend(&tiny);
            args.extend(["--mixer", mixer, "--steps", "6", "--checkpoint-every", "2"]);
            args.extend(extra);
            let o = run(&args);
            assert!(o.status.success(), "{mixer}: {}", stderr(&o));
        };
        let straight = dir.path().join(format!("{mixer}-straight"));
        train(&straight, &[]);
        let resumed = dir.path().join(format!("{mixer}-resumed"));
        train(&resumed, &["--stop-at", "3"]);
        let out_s = resumed.to_string_lossy().into_owned();
        let o = run(&["train", "--out", &out_s, "--resume", "--progress", "quiet"]);
        assert!(o.status.success(), "{mixer}: {}", stderr(&o));

        let (a, b) = (losses(&straight), losses(&resumed));
        assert_eq!(a.len(), 6, "{mixer}: {a:?}");
        assert_eq!(b.len(), 6, "{mixer}: {b:?}");
        // Evaluated at steps 2 and 4; step 6's evaluation comes after its checkpoint.
        assert_eq!(
            a.iter().filter(|r| r.2.is_some()).count(),
            2,
            "{mixer}: {a:?}"
        );
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.0, y.0);
            if x.0 > 3 {
                // Computed after the resume, in the second process: exactly equal.
                assert_eq!(x.1.to_bits(), y.1.to_bits(), "{mixer} step {}", x.0);
                assert_eq!(
                    x.2.map(f64::to_bits),
                    y.2.map(f64::to_bits),
                    "{mixer} step {}",
                    x.0
                );
            } else {
                // Computed before the stop and read back from the checkpoint's JSON: equal
                // to JSON's decimal round trip.
                assert!(
                    (x.1 - y.1).abs() <= 1e-15 * x.1.abs(),
                    "{mixer} step {}",
                    x.0
                );
            }
        }
        // The final weights, tensor by tensor (the safetensors header's metadata map is
        // written in hash order, so the files' bytes may differ where the values do not).
        let final_weights = tensors(&straight.join("model.safetensors"));
        assert!(final_weights.len() > 10, "{mixer}: {final_weights:?}");
        assert!(
            final_weights == tensors(&resumed.join("model.safetensors")),
            "{mixer}: the final weights differ"
        );
    }
}

/// `convert` of the tiny Hugging Face BitNet fixture (`tests/fixtures/bitnet-tiny`, whose
/// logits `tests/hf_bitnet.rs` checks against transformers'): it writes the packed file and
/// copies the tokenizer beside it, `generate` then runs it; broken checkpoints are clear
/// errors.
#[test]
fn convert_writes_a_packed_file_that_generate_runs() {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/bitnet-tiny/packed");
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    std::fs::create_dir(&hf).unwrap();
    for name in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(name), hf.join(name)).unwrap();
    }
    // The fixture has no tokenizer: any of at most 300 tokens (its vocabulary) will do.
    let data = corpus(dir.path()).to_string_lossy().into_owned();
    train_tokenizer(&data, &hf.join("tokenizer.json").to_string_lossy());
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("model.packed.safetensors");
    let (hf_s, out_s) = (hf.to_string_lossy(), out.to_string_lossy());

    let o = run(&["convert", "--hf", &hf_s, "--out", &out_s]);
    assert!(o.status.success(), "{}", stderr(&o));
    let printed = stdout(&o);
    assert!(
        printed.contains("2 key/value") && printed.contains("multiplying (autobitlinear)"),
        "{printed}"
    );
    assert!(printed.contains("reloaded by memory map"), "{printed}");
    assert_eq!(
        std::fs::read(out_dir.join("tokenizer.json")).unwrap(),
        std::fs::read(hf.join("tokenizer.json")).unwrap()
    );

    let o = run(&[
        "generate",
        "--model",
        &out_s,
        "--prompt",
        "the whale",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("the whale"), "{}", stdout(&o));

    // Another tokenizer already beside the output: refused before anything is written.
    std::fs::write(out_dir.join("tokenizer.json"), "{}").unwrap();
    let other = out_dir.join("other.packed.safetensors");
    fails_with(
        &["convert", "--hf", &hf_s, "--out", &other.to_string_lossy()],
        "holds another tokenizer",
    );
    assert!(!other.exists());

    fails_with(
        &[
            "convert",
            "--hf",
            &dir.path().join("nothing").to_string_lossy(),
            "--out",
            &out_s,
        ],
        "not a directory",
    );
    let config = std::fs::read_to_string(hf.join("config.json")).unwrap();
    std::fs::write(
        hf.join("config.json"),
        config.replace("\"model_type\": \"bitnet\"", "\"model_type\": \"llama\""),
    )
    .unwrap();
    fails_with(
        &["convert", "--hf", &hf_s, "--out", &out_s],
        "unsupported checkpoint",
    );
}

#[test]
fn study_trains_six_matched_models_and_writes_its_table_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let good = corpus(dir.path()).to_string_lossy().into_owned();
    let other = dir.path().join("other.txt");
    std::fs::write(
        &other,
        "Call me Ishmael. Some years ago, never mind how long. ".repeat(40),
    )
    .unwrap();
    let other = other.to_string_lossy().into_owned();
    let out = dir.path().join("study");
    let out_s = out.to_string_lossy().into_owned();
    let study = |extra: &[&str]| {
        let mut a = vec![
            "study",
            "--out",
            &out_s,
            "--data",
            &good,
            "--vocab-size",
            "300",
            "--seq-len",
            "16",
            "--batch-size",
            "4",
            "--long-window",
            "64",
            "--decode-context",
            "8,200",
        ];
        a.extend(extra);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    for (extra, needle) in [
        (
            &["--minutes-per-model", "0"][..],
            "--minutes-per-model must be",
        ),
        (
            &["--long-window", "8"][..],
            "shorter than the training windows",
        ),
        (&["--threads", "0"][..], "--threads must be at least 1"),
        (
            &["--decode-context", "300000"][..],
            "above the study's 262144 tokens",
        ),
        (&["--eval-data", "/nonexistent/x.txt"][..], "does not exist"),
        (
            &["--long-window", "100000"][..],
            "too few for sequences of 100000 tokens",
        ),
    ] {
        let args = study(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_with(&refs, needle);
        assert!(!out.exists(), "{extra:?} wrote the study directory");
    }

    // A budget of 10 steps (the least) per model.
    let args = study(&["--minutes-per-model", "0.0001", "--eval-data", &other]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run(&refs);
    assert!(o.status.success(), "{}", stderr(&o));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("study.json")).unwrap()).unwrap();
    let table = std::fs::read_to_string(out.join("study.md")).unwrap();
    assert!(table.contains("| interpolated bigram | - | - |"), "{table}");
    assert_eq!(json["bigram"]["by_position"].as_array().unwrap().len(), 2);
    assert_eq!(stdout(&o).matches("| ttt_mlp-ternary |").count(), 1);
    assert_eq!(json["steps"], 10);
    let models = json["models"].as_array().unwrap();
    let names: Vec<&str> = models.iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "attention-f32",
            "attention-ternary",
            "ttt_linear-f32",
            "ttt_linear-ternary",
            "ttt_mlp-f32",
            "ttt_mlp-ternary"
        ]
    );
    let target = models[2]["parameters"].as_f64().unwrap();
    for m in models {
        let name = m["name"].as_str().unwrap();
        assert!(
            table.contains(&format!("| {name} |")),
            "{name} missing from the table"
        );
        let p = m["parameters"].as_f64().unwrap();
        assert!(
            (p - target).abs() / target < 0.03,
            "{name}: {p} parameters vs {target}"
        );
        let scores = m["scores"].as_array().unwrap();
        assert_eq!(scores.len(), 2, "validation and other.txt");
        assert_eq!(scores[1]["name"], "other.txt");
        for s in scores {
            let nats = s["nats_per_token"].as_f64().unwrap();
            // Trained a little: below the uniform guess over the vocabulary, above zero.
            assert!(nats > 0.0 && nats < (300f64).ln() + 0.5, "{name}: {nats}");
            assert!(s["bits_per_byte"].as_f64().unwrap() > 0.0);
            // Buckets 0–16, 16–64 of the 64-token windows.
            assert_eq!(s["by_position"].as_array().unwrap().len(), 2, "{name}");
        }
        let decode = m["decode_ms"].as_array().unwrap();
        assert_eq!(decode.len(), 2);
        assert!(decode.iter().all(|d| d[1].as_f64().unwrap() > 0.0));
        assert!(
            m["curve"].as_array().unwrap().len() >= 2,
            "{name}: a loss curve"
        );
    }
    for png in ["loss_curves.png", "loss_by_position.png"] {
        assert_eq!(
            &std::fs::read(out.join(png)).unwrap()[1..4],
            b"PNG",
            "{png}"
        );
    }
}
