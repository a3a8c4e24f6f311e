//! Data-parallel training as real processes on 127.0.0.1: a group of 2 or 3 processes, each
//! with its share of the batch, trains as one process with the whole batch; a group stops and
//! resumes as one run; a process that dies or hangs makes the others fail within the timeout.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Losses of groups and of one process may differ by the order of the floating-point sums
/// (gradients added across processes, then divided, instead of one mean over the batch).
const LOSS_TOLERANCE: f64 = 1e-4;
/// The same for the final weights (after 6 AdamW steps of learning rate below 4e-4).
const WEIGHT_TOLERANCE: f32 = 1e-5;

/// (step, train_loss, val_loss) of every row of a run's metrics.csv.
fn metrics(run: &Path) -> Vec<(u64, f64, Option<f64>)> {
    let text = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    text.lines()
        .skip(1)
        .map(|line| {
            let cells: Vec<&str> = line.split(',').collect();
            (
                cells[0].parse().unwrap(),
                cells[2].parse().unwrap(),
                cells[3].parse().ok(),
            )
        })
        .collect()
}

/// The f32 values of every tensor of a safetensors file, by name.
fn weights(path: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    tensors(path)
        .into_iter()
        .map(|(name, (entry, bytes))| {
            assert_eq!(entry["dtype"], "F32", "{name}");
            let values = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (name, values)
        })
        .collect()
}

struct Setup {
    dir: tempfile::TempDir,
    data: String,
    tok: String,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path()).to_string_lossy().into_owned();
    let tok = dir.path().join("tok.json").to_string_lossy().into_owned();
    train_tokenizer(&data, &tok);
    Setup { dir, data, tok }
}

impl Setup {
    /// `train` of the tiny model for `steps` steps in run directory `name`, with `extra` flags.
    fn train_args(&self, name: &str, steps: &str, extra: &[&str]) -> Vec<String> {
        let out = self.dir.path().join(name).to_string_lossy().into_owned();
        let mut args: Vec<String> = ["train", "--out", &out, "--data", &self.data]
            .iter()
            .chain(&["--tokenizer", &self.tok])
            .chain(TINY)
            .chain(&[
                "--steps",
                steps,
                "--eval-every",
                "3",
                "--checkpoint-every",
                "3",
            ])
            .chain(extra)
            .map(|s| s.to_string())
            .collect();
        // TINY's batch of 4 is replaced by the caller's.
        if extra.contains(&"--batch-size") {
            let i = args.iter().position(|a| a == "--batch-size").unwrap();
            args.drain(i..i + 2);
        }
        args
    }

    fn train(&self, name: &str, steps: &str, extra: &[&str]) -> std::process::Output {
        let args = self.train_args(name, steps, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = run(&args);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        o
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

#[test]
fn groups_of_2_and_3_train_as_one_process_with_the_whole_batch() {
    let s = setup();
    for processes in [2usize, 3] {
        let whole = (2 * processes).to_string();
        let n = processes.to_string();
        s.train(&format!("one-{n}"), "6", &["--batch-size", &whole]);
        let o = s.train(
            &format!("group-{n}"),
            "6",
            &[
                "--batch-size",
                "2",
                "--launch-local",
                &n,
                "--collective-timeout",
                "60",
            ],
        );
        assert!(
            stdout(&o).contains(&format!("group: {n} processes")),
            "{}",
            stdout(&o)
        );
        let (one, group) = (
            metrics(&s.path(&format!("one-{n}"))),
            metrics(&s.path(&format!("group-{n}"))),
        );
        assert_eq!(one.len(), 6);
        assert_eq!(group.len(), 6);
        let mut worst = 0.0f64;
        for (a, b) in one.iter().zip(&group) {
            assert_eq!(a.0, b.0);
            worst = worst.max((a.1 - b.1).abs());
            assert_eq!(a.2.is_some(), b.2.is_some(), "step {}", a.0);
            if let (Some(x), Some(y)) = (a.2, b.2) {
                worst = worst.max((x - y).abs());
            }
        }
        assert!(
            worst <= LOSS_TOLERANCE,
            "{n} processes: losses differ by {worst}:\n{one:?}\n{group:?}"
        );
        let (wa, wb) = (
            weights(&s.path(&format!("one-{n}")).join("model.safetensors")),
            weights(&s.path(&format!("group-{n}")).join("model.safetensors")),
        );
        assert_eq!(wa.len(), wb.len());
        assert!(wa.len() > 10);
        let mut worst_weight = 0.0f32;
        for (name, a) in &wa {
            for (x, y) in a.iter().zip(&wb[name]) {
                worst_weight = worst_weight.max((x - y).abs());
            }
        }
        assert!(
            worst_weight <= WEIGHT_TOLERANCE,
            "{n} processes: weights differ by {worst_weight}"
        );
        eprintln!("{n} processes: losses within {worst:.2e}, weights within {worst_weight:.2e}");
    }
}

#[test]
fn a_group_stops_and_resumes_as_one_run() {
    let s = setup();
    let group = [
        "--batch-size",
        "2",
        "--launch-local",
        "2",
        "--collective-timeout",
        "60",
    ];
    s.train("straight", "6", &group);
    s.train("resumed", "6", &[&group[..], &["--stop-at", "3"]].concat());
    assert!(!s.path("resumed").join("model.safetensors").exists());
    let out = s.path("resumed").to_string_lossy().into_owned();
    // Another group size would read the data in another order.
    fails_with(
        &["train", "--out", &out, "--resume", "--launch-local", "3"],
        "trained by 2 process(es)",
    );
    let o = run(&[
        "train",
        "--out",
        &out,
        "--resume",
        "--progress",
        "quiet",
        "--launch-local",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (metrics(&s.path("straight")), metrics(&s.path("resumed")));
    assert_eq!(a.len(), 6);
    assert_eq!(b.len(), 6);
    for (x, y) in a.iter().zip(&b) {
        // The same group computes the same sums in the same order: equal after the resume,
        // equal to the CSV's decimals before it (read back from the checkpoint's JSON).
        assert_eq!(x.0, y.0);
        assert!((x.1 - y.1).abs() <= 1e-6 * x.1.abs(), "step {}", x.0);
        assert_eq!(x.2.is_some(), y.2.is_some());
    }
    assert!(
        tensors(&s.path("straight").join("model.safetensors"))
            == tensors(&s.path("resumed").join("model.safetensors")),
        "the final weights differ"
    );
}

/// A rank of a group started by a test, its stderr read on a thread as it comes.
struct Rank {
    child: Child,
    lines: mpsc::Receiver<String>,
    reader: std::thread::JoinHandle<String>,
}

impl Rank {
    /// Starts rank `rank` of a group of `processes` at `port`, training for a long time.
    fn start(s: &Setup, port: u16, processes: usize, rank: usize, timeout: &str) -> Rank {
        // Later flags replace TINY's and train_args' (clap keeps the last).
        let args = s.train_args(
            "long",
            "100000",
            &[
                "--processes",
                &processes.to_string(),
                "--rank",
                &rank.to_string(),
                "--coordinator",
                &format!("127.0.0.1:{port}"),
                "--collective-timeout",
                timeout,
                "--checkpoint-every",
                "0",
                "--eval-every",
                "0",
                "--progress",
                "lines",
            ],
        );
        let mut child = bin()
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (send, lines) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            for line in BufReader::new(stderr).lines() {
                let line = line.unwrap_or_default();
                text.push_str(&line);
                text.push('\n');
                let _ = send.send(line);
            }
            text
        });
        Rank {
            child,
            lines,
            reader,
        }
    }

    /// Waits until this rank prints a line containing `needle` (the group trains once rank 0
    /// prints its first step: every rank has joined and installed its Ctrl-C handler).
    fn wait_for(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return,
                Ok(_) => {}
                Err(e) => panic!("no {needle:?} from the rank: {e}"),
            }
        }
    }

    /// Sends `signal` (`-STOP`, `-INT`, …) to the rank.
    fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(sent.success(), "kill {signal} {pid}");
    }

    /// Waits at most `limit` for the rank to exit; its exit status, stdout and stderr.
    fn exit_within(mut self, limit: Duration) -> (std::process::ExitStatus, String, String) {
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > limit {
                self.child.kill().unwrap();
                self.child.wait().unwrap();
                panic!(
                    "still running after {limit:?}:\n{}",
                    self.reader.join().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stdout = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .unwrap();
        (status, stdout, self.reader.join().unwrap())
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// rank 0's line for the first step.
const FIRST_STEP: &str = "step      1/";

/// A group of two ranks with collective timeout `timeout`, once it trains.
fn training_pair(s: &Setup, timeout: &str) -> (Rank, Rank) {
    let port = free_port();
    let r0 = Rank::start(s, port, 2, 0, timeout);
    let r1 = Rank::start(s, port, 2, 1, timeout);
    r0.wait_for(FIRST_STEP);
    (r0, r1)
}

#[test]
fn a_killed_process_makes_the_others_fail_at_once() {
    let s = setup();
    let port = free_port();
    // A timeout far above the time the test allows: the failure must come from the closed
    // connections, not from waiting.
    let mut ranks: Vec<Rank> = (0..3).map(|r| Rank::start(&s, port, 3, r, "600")).collect();
    ranks[0].wait_for(FIRST_STEP);
    let r2 = ranks.pop().unwrap();
    let r1 = ranks.pop().unwrap();
    let r0 = ranks.pop().unwrap();
    r1.kill();
    let (status0, _, err0) = r0.exit_within(Duration::from_secs(30));
    let (status2, _, err2) = r2.exit_within(Duration::from_secs(30));
    assert!(!status0.success(), "{err0}");
    assert!(err0.contains("rank 1 closed its connection"), "{err0}");
    assert!(!status2.success(), "{err2}");
    assert!(err2.contains("rank 0 closed its connection"), "{err2}");
    for err in [err0, err2] {
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn a_hung_process_makes_the_others_fail_after_the_timeout() {
    let s = setup();
    let (r0, r1) = training_pair(&s, "4");
    // SIGSTOP: the process stays alive and its connection open, but it answers nothing.
    r1.signal("-STOP");
    let started = Instant::now();
    let (status0, _, err0) = r0.exit_within(Duration::from_secs(60));
    let waited = started.elapsed();
    r1.kill();
    assert!(!status0.success(), "{err0}");
    assert!(
        err0.contains("no answer from the group within 4 s"),
        "{err0}"
    );
    assert!(
        waited >= Duration::from_secs(3),
        "failed after {waited:?}: {err0}"
    );
    assert!(!err0.contains("panicked"), "{err0}");
}

#[test]
fn ctrl_c_on_one_process_stops_the_whole_group_with_a_checkpoint() {
    let s = setup();
    let (r0, r1) = training_pair(&s, "60");
    // Only rank 1 is told; its stop vote travels with the next step's gradients.
    r1.signal("-INT");
    let (status1, _, err1) = r1.exit_within(Duration::from_secs(60));
    let (status0, out0, err0) = r0.exit_within(Duration::from_secs(60));
    assert_eq!(status0.code(), Some(130), "{out0}\n{err0}");
    assert_eq!(status1.code(), Some(130), "{err1}");
    // Both stopped after the same step, and rank 0 saved it.
    let step: usize = out0
        .split("stopped at step ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out0}"));
    assert!(
        err1.contains(&format!("rank 1 of 2: {step} steps done")),
        "{err1}"
    );
    assert!(s
        .path("long")
        .join(format!("checkpoints/step-{step:06}"))
        .is_dir());
}

#[test]
fn bad_group_settings_are_clear_errors() {
    let s = setup();
    let check = |extra: &[&str], needle: &str| {
        let a = s.train_args("bad", "2", extra);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        fails_with(&a, needle);
    };
    check(&["--rank", "1"], "--rank 1 needs --processes above it");
    check(
        &["--processes", "2", "--rank", "2"],
        "--rank 2 is outside 0..2",
    );
    check(&["--processes", "100000"], "--processes must be 2 to 256");
    check(
        &["--processes", "2", "--coordinator", "127.0.0.1:0"],
        "port other than 0",
    );
    check(
        &["--processes", "2", "--collective-timeout", "0"],
        "--collective-timeout must be 1 to",
    );
    check(
        &[
            "--processes",
            "2",
            "--rank",
            "1",
            "--coordinator",
            "0.0.0.0:29500",
        ],
        "need the address of rank 0's machine",
    );
    check(
        &["--launch-local", "0"],
        "--launch-local needs 1 to 256 processes",
    );
    check(
        &["--launch-local", "2", "--rank", "1"],
        "cannot be used with",
    );
    // Nobody at the coordinator: rank 1 gives up after its timeout.
    let port = free_port().to_string();
    check(
        &[
            "--processes",
            "2",
            "--rank",
            "1",
            "--coordinator",
            &format!("127.0.0.1:{port}"),
            "--collective-timeout",
            "1",
        ],
        "connecting to rank 0",
    );
}
