//! [`AllReduce`] over plain TCP (`std::net`), star-shaped: rank 0 listens on the coordinator
//! address, the other ranks connect to it; each sum round, every rank sends its values to rank
//! 0, which adds them in rank order and sends the total back. Every process therefore receives
//! the same bits, whatever the arrival order.
//!
//! A process that dies closes its socket, which the others see at once (end of stream); one
//! that hangs is caught by the read and write timeouts. Either way every process fails with a
//! [`DistributedError`] instead of waiting forever, and rank 0 closing its sockets on failure
//! stops the rest.
//!
//! Rank 0 accepts a connection only on the address given, but there is no authentication or
//! encryption: run it on a trusted network.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::{AllReduce, DistributedError, GroupConfig};

/// The first bytes of every connection: protocol name and version.
const MAGIC: &[u8; 8] = b"BTTT-DP1";

/// Rank 0's word that every rank has joined.
const GROUP_COMPLETE: &[u8; 8] = b"BTTT-ALL";

/// Values per read or write: the sums run chunk by chunk, without a copy of the whole buffer.
const CHUNK_VALUES: usize = 1 << 18;

/// Rank 0's answers to a hello.
const ACCEPTED: u32 = 0;
const WRONG_GROUP_SIZE: u32 = 1;
const RANK_TAKEN: u32 = 2;

/// A member of a group over TCP.
#[derive(Debug)]
pub struct TcpGroup {
    config: GroupConfig,
    /// Rank 0: the stream of every other rank, by rank (index 0 unused). Others: rank 0's.
    peers: Vec<Option<TcpStream>>,
    broken: bool,
}

impl TcpGroup {
    /// Joins the group `config` describes: rank 0 listens on `config.coordinator` and waits
    /// for every other rank, which connect to it (retrying until rank 0 is up); both at most
    /// `config.join_timeout`.
    ///
    /// # Errors
    /// A bad config, an address that cannot be bound, a group that does not assemble in time,
    /// or a process of another group (other size, duplicate rank, not ours).
    pub fn join(config: GroupConfig) -> Result<Self, DistributedError> {
        config.validate()?;
        let deadline = Instant::now() + config.join_timeout;
        let peers = if config.rank == 0 {
            let mut peers = accept_all(&config, deadline)?;
            // Tells every member the group is complete: until then a member waits with the
            // join timeout, not the (per round) collective timeout.
            for (rank, stream) in peers.iter_mut().enumerate().skip(1) {
                let stream = stream.as_mut().expect("accept_all fills every rank");
                stream
                    .write_all(GROUP_COMPLETE)
                    .map_err(|e| peer_error(e.into(), rank, "joining", config.join_timeout))?;
            }
            peers
        } else {
            let mut stream = connect(&config, deadline)?;
            let mut complete = [0u8; 8];
            stream
                .set_read_timeout(Some(
                    deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_secs(1)),
                ))
                .and_then(|()| stream.read_exact(&mut complete))
                .map_err(|e| match e.kind() {
                    ErrorKind::WouldBlock | ErrorKind::TimedOut => DistributedError::Timeout {
                        what: "waiting for the other ranks to join".into(),
                        timeout: config.join_timeout,
                    },
                    _ => peer_error(e.into(), 0, "completing the group", config.join_timeout),
                })?;
            if &complete != GROUP_COMPLETE {
                return Err(DistributedError::Collective(
                    "rank 0 sent something else than the group's completion".into(),
                ));
            }
            vec![Some(stream)]
        };
        for stream in peers.iter().flatten() {
            stream
                .set_read_timeout(Some(config.timeout))
                .and_then(|()| stream.set_write_timeout(Some(config.timeout)))
                .map_err(|e| io_error("configuring a connection", e))?;
        }
        Ok(Self {
            config,
            peers,
            broken: false,
        })
    }

    /// Rank 0's round: receive every rank's values, add them in rank order, send the total.
    fn sum_as_coordinator(&mut self, values: &mut [f32]) -> Result<(), DistributedError> {
        let timeout = self.config.timeout;
        let mut bytes = vec![0u8; CHUNK_VALUES.min(values.len()) * 4];
        for (rank, stream) in self.peers.iter_mut().enumerate().skip(1) {
            let stream = stream
                .as_mut()
                .expect("rank 0 holds every other rank's stream");
            read_values(stream, values, &mut bytes, |total, v| *total += v)
                .map_err(|e| peer_error(e, rank, "sending its values", timeout))?;
        }
        for (rank, stream) in self.peers.iter_mut().enumerate().skip(1) {
            let stream = stream
                .as_mut()
                .expect("rank 0 holds every other rank's stream");
            write_values(stream, values, &mut bytes)
                .map_err(|e| peer_error(e.into(), rank, "receiving the sum", timeout))?;
        }
        Ok(())
    }

    /// Another rank's round: send the values to rank 0, receive the total.
    fn sum_as_member(&mut self, values: &mut [f32]) -> Result<(), DistributedError> {
        let timeout = self.config.timeout;
        let stream = self.peers[0]
            .as_mut()
            .expect("a member holds rank 0's stream");
        let mut bytes = vec![0u8; CHUNK_VALUES.min(values.len()) * 4];
        write_values(stream, values, &mut bytes)
            .map_err(|e| peer_error(e.into(), 0, "receiving our values", timeout))?;
        read_values(stream, values, &mut bytes, |value, sum| *value = sum)
            .map_err(|e| peer_error(e, 0, "sending the sum", timeout))?;
        Ok(())
    }
}

impl AllReduce for TcpGroup {
    fn rank(&self) -> usize {
        self.config.rank
    }

    fn processes(&self) -> usize {
        self.config.processes
    }

    fn sum(&mut self, values: &mut [f32]) -> Result<(), DistributedError> {
        if self.broken {
            return Err(DistributedError::Collective(
                "the group failed earlier; it cannot be used again".into(),
            ));
        }
        let result = if self.config.rank == 0 {
            self.sum_as_coordinator(values)
        } else {
            self.sum_as_member(values)
        };
        if result.is_err() {
            // Closing every connection makes the other processes fail now, not at their
            // timeout.
            self.broken = true;
            for stream in self.peers.iter().flatten() {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
        result
    }
}

/// Writes one message, `[count: u64 LE][count f32 LE]`, through `bytes` (a chunk's room).
fn write_values(stream: &mut TcpStream, values: &[f32], bytes: &mut [u8]) -> std::io::Result<()> {
    stream.write_all(&(values.len() as u64).to_le_bytes())?;
    for chunk in values.chunks(CHUNK_VALUES) {
        let bytes = &mut bytes[..chunk.len() * 4];
        for (b, v) in bytes.chunks_exact_mut(4).zip(chunk) {
            b.copy_from_slice(&v.to_le_bytes());
        }
        stream.write_all(bytes)?;
    }
    Ok(())
}

/// What went wrong reading or writing a peer's stream.
enum PeerFailure {
    Io(std::io::Error),
    /// It sent another number of values than ours.
    Count {
        /// Its number.
        sent: u64,
        /// Ours.
        expected: usize,
    },
}

impl From<std::io::Error> for PeerFailure {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// Reads one message of as many values as `values` holds (the count is checked before any
/// value is read), chunk by chunk through `bytes`, and `combine`s each into its place.
fn read_values(
    stream: &mut TcpStream,
    values: &mut [f32],
    bytes: &mut [u8],
    combine: impl Fn(&mut f32, f32),
) -> Result<(), PeerFailure> {
    let mut header = [0u8; 8];
    stream.read_exact(&mut header)?;
    let sent = u64::from_le_bytes(header);
    if sent != values.len() as u64 {
        return Err(PeerFailure::Count {
            sent,
            expected: values.len(),
        });
    }
    for chunk in values.chunks_mut(CHUNK_VALUES) {
        let bytes = &mut bytes[..chunk.len() * 4];
        stream.read_exact(bytes)?;
        for (value, b) in chunk.iter_mut().zip(bytes.chunks_exact(4)) {
            combine(value, f32::from_le_bytes(b.try_into().expect("4 bytes")));
        }
    }
    Ok(())
}

fn peer_error(
    failure: PeerFailure,
    rank: usize,
    doing: &str,
    timeout: Duration,
) -> DistributedError {
    match failure {
        PeerFailure::Count { sent, expected } => DistributedError::Collective(format!(
            "rank {rank} sent {sent} values to add, this process {expected}: every process must train the same model"
        )),
        PeerFailure::Io(e) => match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => DistributedError::Timeout {
                what: format!("rank {rank} {doing}"),
                timeout,
            },
            ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe => DistributedError::PeerLost {
                rank,
                detail: e.to_string(),
            },
            _ => io_error(&format!("rank {rank} {doing}"), e),
        },
    }
}

fn io_error(what: &str, e: std::io::Error) -> DistributedError {
    DistributedError::Collective(format!("{what}: {e}"))
}

/// Rank 0: binds the coordinator address and accepts one connection per other rank.
fn accept_all(
    config: &GroupConfig,
    deadline: Instant,
) -> Result<Vec<Option<TcpStream>>, DistributedError> {
    let listener = TcpListener::bind(config.coordinator).map_err(|e| {
        DistributedError::InvalidSetting(format!(
            "cannot listen on --coordinator {}: {e} (rank 0 listens there: it must be an address of rank 0's machine, with a free port)",
            config.coordinator
        ))
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| io_error("configuring the coordinator", e))?;
    let mut peers: Vec<Option<TcpStream>> = (0..config.processes).map(|_| None).collect();
    let mut missing = config.processes - 1;
    while missing > 0 {
        match listener.accept() {
            Ok((stream, from)) => {
                if let Some(rank) = greet_member(stream, from, config, &mut peers, deadline)? {
                    eprintln!(
                        "rank 0: rank {rank} joined from {from} ({} of {})",
                        config.processes - missing + 1,
                        config.processes
                    );
                    missing -= 1;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let absent: Vec<String> = (1..config.processes)
                        .filter(|&r| peers[r].is_none())
                        .map(|r| r.to_string())
                        .collect();
                    return Err(DistributedError::Timeout {
                        what: format!("waiting for rank(s) {} to join", absent.join(", ")),
                        timeout: config.join_timeout,
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(io_error("accepting a connection", e)),
        }
    }
    Ok(peers)
}

/// Reads a member's hello and answers it; `Some(rank)` when it joined. A connection that is
/// not a bit-ttt-train process is dropped with a warning, and the wait goes on; a process of
/// ours with another group size or a taken rank is answered so and fails the group (the
/// flags are wrong somewhere).
fn greet_member(
    mut stream: TcpStream,
    from: SocketAddr,
    config: &GroupConfig,
    peers: &mut [Option<TcpStream>],
    deadline: Instant,
) -> Result<Option<usize>, DistributedError> {
    let hello_timeout = deadline
        .saturating_duration_since(Instant::now())
        .clamp(Duration::from_millis(100), Duration::from_secs(10));
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(hello_timeout)))
        .and_then(|()| stream.set_write_timeout(Some(hello_timeout)))
        .and_then(|()| stream.set_nodelay(true));
    if let Err(e) = setup {
        eprintln!("warning: rank 0: dropped a connection from {from}: {e}");
        return Ok(None);
    }
    let mut hello = [0u8; 16];
    if let Err(e) = stream.read_exact(&mut hello) {
        eprintln!("warning: rank 0: dropped a connection from {from} that sent no hello: {e}");
        return Ok(None);
    }
    if &hello[..8] != MAGIC {
        eprintln!("warning: rank 0: dropped a connection from {from} that is not a bit-ttt-train process of this version");
        return Ok(None);
    }
    let processes = u32::from_le_bytes(hello[8..12].try_into().expect("4 bytes")) as usize;
    let rank = u32::from_le_bytes(hello[12..16].try_into().expect("4 bytes")) as usize;
    let answer = if processes != config.processes {
        WRONG_GROUP_SIZE
    } else if rank == 0 || rank >= processes || peers[rank].is_some() {
        RANK_TAKEN
    } else {
        ACCEPTED
    };
    let mut reply = MAGIC.to_vec();
    reply.extend_from_slice(&answer.to_le_bytes());
    reply.extend_from_slice(&(config.processes as u32).to_le_bytes());
    let sent = stream.write_all(&reply);
    if answer != ACCEPTED {
        let problem = if answer == WRONG_GROUP_SIZE {
            format!(
                "has --processes {processes}, this group {}",
                config.processes
            )
        } else {
            format!(
                "has rank {rank}, which is taken or outside 1..{}",
                config.processes
            )
        };
        return Err(DistributedError::InvalidSetting(format!(
            "a process from {from} {problem}; every process needs the same --processes and its own --rank"
        )));
    }
    sent.map_err(|e| io_error(&format!("answering rank {rank}"), e))?;
    peers[rank] = Some(stream);
    Ok(Some(rank))
}

/// Another rank: connects to rank 0 (retrying until it listens) and says hello.
fn connect(config: &GroupConfig, deadline: Instant) -> Result<TcpStream, DistributedError> {
    let mut stream = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(DistributedError::Timeout {
                what: format!("connecting to rank 0 at {}", config.coordinator),
                timeout: config.join_timeout,
            });
        }
        match TcpStream::connect_timeout(&config.coordinator, left.min(Duration::from_secs(5))) {
            Ok(stream) => break stream,
            // Rank 0 is not listening yet (or the network is slow to answer): retry.
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let hello_timeout = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(1));
    stream
        .set_nodelay(true)
        .and_then(|()| stream.set_read_timeout(Some(hello_timeout)))
        .and_then(|()| stream.set_write_timeout(Some(hello_timeout)))
        .map_err(|e| io_error("configuring the connection to rank 0", e))?;
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&(config.processes as u32).to_le_bytes());
    hello.extend_from_slice(&(config.rank as u32).to_le_bytes());
    stream
        .write_all(&hello)
        .map_err(|e| io_error("greeting rank 0", e))?;
    let mut reply = [0u8; 16];
    stream.read_exact(&mut reply).map_err(|e| {
        DistributedError::Collective(format!(
            "rank 0 at {} did not answer our hello ({e}); is it a bit-ttt-train of this version?",
            config.coordinator
        ))
    })?;
    if &reply[..8] != MAGIC {
        return Err(DistributedError::Collective(format!(
            "{} is not a bit-ttt-train coordinator of this version",
            config.coordinator
        )));
    }
    let answer = u32::from_le_bytes(reply[8..12].try_into().expect("4 bytes"));
    let their_processes = u32::from_le_bytes(reply[12..16].try_into().expect("4 bytes"));
    match answer {
        ACCEPTED => Ok(stream),
        WRONG_GROUP_SIZE => Err(DistributedError::InvalidSetting(format!(
            "rank 0 leads a group of {their_processes} processes, this process has --processes {}",
            config.processes
        ))),
        _ => Err(DistributedError::InvalidSetting(format!(
            "rank {} is already taken in the group at {}; every process needs its own --rank",
            config.rank, config.coordinator
        ))),
    }
}
