//! `train`'s data-parallel flags: a process of a group (`--processes`, `--rank`, …), and
//! `--launch-local N`, which starts a whole group on this machine.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Args};

use crate::distributed::{GroupConfig, MAX_PROCESSES};

use super::Exit;

#[derive(Args, Debug, Clone)]
pub struct GroupArgs {
    /// Processes training together (data-parallel): each computes the gradients of
    /// --batch-size sequences of every step, the group averages them, so a step trains on
    /// --batch-size x --processes sequences. Start one process per rank, on this machine or
    /// others, each with the same flags but --rank.
    #[arg(long, default_value_t = 1, help_heading = "Data-parallel training")]
    pub processes: usize,
    /// This process's rank, 0..--processes. Rank 0 leads the group and alone writes the run
    /// directory (the others read it on --resume: copy it to the same path on every machine).
    #[arg(long, default_value_t = 0, help_heading = "Data-parallel training")]
    pub rank: usize,
    /// Rank 0's IP:port, the same for every process: rank 0 listens there (on that address
    /// only), the others connect to it. The connections are plain TCP, neither authenticated
    /// nor encrypted: use addresses of a trusted network (default: this machine only).
    #[arg(
        long,
        default_value = "127.0.0.1:29500",
        help_heading = "Data-parallel training"
    )]
    pub coordinator: SocketAddr,
    /// Seconds to wait for the other processes (to join, and at each step) before failing.
    #[arg(long, default_value_t = 300, help_heading = "Data-parallel training")]
    pub collective_timeout: u64,
    /// Start N processes of this training on this machine (ranks 0..N, coordinator on a free
    /// port of 127.0.0.1, one compute thread each unless RAYON_NUM_THREADS is set) and wait
    /// for them; one that fails stops the others.
    #[arg(long, value_name = "N", conflicts_with_all = ["processes", "rank", "coordinator"], help_heading = "Data-parallel training")]
    pub launch_local: Option<usize>,
}

impl GroupArgs {
    /// The group this process is part of (`None` when it trains alone).
    pub fn config(&self) -> Result<Option<GroupConfig>> {
        if self.processes <= 1 {
            if self.rank != 0 {
                bail!("--rank {} needs --processes above it", self.rank);
            }
            return Ok(None);
        }
        if self.rank == 0 && self.coordinator.ip().is_unspecified() {
            eprintln!(
                "warning: --coordinator {}: rank 0 listens on every interface of this machine, without authentication",
                self.coordinator
            );
        }
        let timeout = Duration::from_secs(self.collective_timeout);
        let config = GroupConfig {
            processes: self.processes,
            rank: self.rank,
            coordinator: self.coordinator,
            timeout,
            join_timeout: timeout,
        };
        config.validate()?;
        Ok(Some(config))
    }
}

/// `--launch-local N`: runs this `train` command as N processes (ranks) on this machine and
/// waits for all; when one fails, the others are stopped (see [`wait_all`]). `command` is
/// `train`'s clap command, whose arguments `matches` holds.
pub fn launch_local(
    n: usize,
    command: &clap::Command,
    matches: Option<&ArgMatches>,
) -> Result<Exit> {
    if !(1..=MAX_PROCESSES).contains(&n) {
        bail!("--launch-local needs 1 to {MAX_PROCESSES} processes, got {n}");
    }
    let matches = matches.context("--launch-local needs the parsed command line")?;
    let exe = std::env::current_exe().context("finding this program")?;
    let is_cli = exe
        .file_stem()
        .is_some_and(|s| s.to_string_lossy().starts_with("bit-ttt-train"));
    if !is_cli {
        bail!("--launch-local starts bit-ttt-train processes; run it from the bit-ttt-train command line");
    }
    let args = typed_args(command, matches, &["launch_local"]);
    // A free port for rank 0, released for it to bind.
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .context("finding a free port on 127.0.0.1")?
        .port();
    eprintln!("starting {n} training process(es) on this machine (coordinator 127.0.0.1:{port})");
    let mut children: Vec<Child> = Vec::with_capacity(n);
    for rank in 0..n {
        let mut command = Command::new(&exe);
        command.arg("train").args(&args);
        if n > 1 {
            command.args([
                "--processes".to_string(),
                n.to_string(),
                "--rank".into(),
                rank.to_string(),
                "--coordinator".into(),
                format!("127.0.0.1:{port}"),
            ]);
        }
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            command.env("RAYON_NUM_THREADS", "1");
        }
        match command.spawn() {
            Ok(child) => children.push(child),
            Err(e) => {
                stop_all(&mut children);
                return Err(e).with_context(|| format!("starting rank {rank}"));
            }
        }
    }
    // Ctrl-C reaches the children too (same process group): they stop together with a
    // checkpoint; this process waits for them.
    let _ = ctrlc::set_handler(|| {});
    let result = wait_all(&mut children);
    if result.is_err() {
        stop_all(&mut children);
    }
    result
}

/// Waits for every child. When one fails, the others get a moment to fail on their own (they
/// notice its closed connection at once), so that every failing rank is reported, the first
/// cause among them; the rest are then stopped.
fn wait_all(children: &mut [Child]) -> Result<Exit> {
    let n = children.len();
    let mut status: Vec<Option<std::process::ExitStatus>> = vec![None; n];
    let mut first_failure: Option<std::time::Instant> = None;
    loop {
        for (rank, child) in children.iter_mut().enumerate() {
            if status[rank].is_none() {
                status[rank] = child
                    .try_wait()
                    .with_context(|| format!("waiting for rank {rank}"))?;
            }
        }
        let failed = |s: &Option<std::process::ExitStatus>| {
            s.is_some_and(|s| !matches!(s.code(), Some(0 | 130)))
        };
        if first_failure.is_none() && status.iter().any(failed) {
            first_failure = Some(std::time::Instant::now());
        }
        let all_done = status.iter().all(Option::is_some);
        let grace_over = first_failure.is_some_and(|t| t.elapsed() > Duration::from_secs(3));
        if all_done || grace_over {
            if first_failure.is_some() {
                let report: Vec<String> = status
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| failed(s) || s.is_none())
                    .map(|(rank, s)| match s {
                        Some(s) => format!("rank {rank} failed ({s})"),
                        None => format!("rank {rank} was still running and was stopped"),
                    })
                    .collect();
                bail!("{} (each process's own error is above)", report.join("; "));
            }
            let interrupted = status.iter().flatten().any(|s| s.code() == Some(130));
            return Ok(if interrupted {
                Exit::Interrupted
            } else {
                Exit::Ok
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stop_all(children: &mut [Child]) {
    for child in children.iter_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The flags typed on the command line (not defaulted), as arguments again, except `skip`.
fn typed_args(command: &clap::Command, matches: &ArgMatches, skip: &[&str]) -> Vec<OsString> {
    let mut args = Vec::new();
    for arg in command.get_arguments() {
        let id = arg.get_id().as_str();
        if skip.contains(&id) || matches.value_source(id) != Some(ValueSource::CommandLine) {
            continue;
        }
        let Some(long) = arg.get_long() else {
            continue;
        };
        args.push(OsString::from(format!("--{long}")));
        if !matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse) {
            if let Some(values) = matches.get_raw(id) {
                args.extend(values.map(OsString::from));
            }
        }
    }
    args
}
