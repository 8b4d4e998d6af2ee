//! Processes around the data path, for launchers, benchmarks, examples and tests: starting
//! `rdmem-memnode` as a child process ([`MemnodeChild`]), finding binaries, fresh tokens, and
//! [`ClusterNode`] for programs that run on every machine of a test cluster at once (which
//! machine this is, and a rendezvous). Nothing in the library's data path uses it.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use crate::error::RdmaError;

/// A `rdmem-memnode` child process, killed when dropped.
pub struct MemnodeChild {
    child: Child,
    addr: String,
    token: String,
    warnings: Arc<Mutex<Vec<String>>>,
}

impl MemnodeChild {
    /// Starts `rdmem-memnode` with `--listen 127.0.0.1:<free port>`, `token` and `args`,
    /// and waits until it serves. The binary is looked for next to the current executable, one
    /// directory up (test binaries live in `target/*/deps`), then on PATH. Its warnings and
    /// errors are passed on to stderr, prefixed with `name`, and kept ([`MemnodeChild::warnings`]);
    /// if it does not start, the error holds them.
    pub fn start(name: &str, token: &str, args: &[&str]) -> Result<Self, RdmaError> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| RdmaError::io("picking a free port", e))?
            .port();
        Self::start_on(name, &format!("127.0.0.1:{port}"), token, args)
    }

    /// [`MemnodeChild::start`], listening on `addr` (`HOST:PORT`, e.g. this machine's address
    /// in a cluster, for clients on other machines).
    pub fn start_on(name: &str, addr: &str, token: &str, args: &[&str]) -> Result<Self, RdmaError> {
        let program = find_binary("rdmem-memnode");
        let addr = addr.to_owned();
        let token = token.to_owned();
        let mut child = Command::new(&program)
            .args(["--listen", &addr])
            .args(args)
            .env("RDMEM_TOKEN", &token)
            .env_remove("RDMEM_TOKEN_FILE")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| RdmaError::io(format!("cannot start {}", program.display()), e))?;
        let stderr = child.stderr.take().expect("piped stderr");
        let (ready_tx, ready_rx) = mpsc::channel();
        let name = name.to_owned();
        let warnings = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&warnings);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("serving node") {
                    let _ = ready_tx.send(());
                } else if line.contains("WARN") || line.contains("ERROR") || line.contains("error:") {
                    eprintln!("[{name}] {line}");
                    kept.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                }
            }
        });
        if ready_rx.recv_timeout(Duration::from_secs(60)).is_err() {
            let _ = child.kill();
            let status = child.wait().map_err(|e| RdmaError::io("waiting for rdmem-memnode", e))?;
            // The reader thread has seen every line once the pipe is closed (recv_timeout above
            // returns when the child exits and its stderr closes).
            let said = warnings.lock().unwrap_or_else(|p| p.into_inner()).join("\n");
            return Err(RdmaError::io(
                format!("{} did not start ({status}): {said}", program.display()),
                std::io::Error::other("memory node failed to start"),
            ));
        }
        Ok(MemnodeChild { child, addr, token, warnings })
    }

    /// Where it listens: `127.0.0.1:<port>`, or the address given to `start_on`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The token it asks for.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The warnings and errors it has logged so far.
    pub fn warnings(&self) -> Vec<String> {
        self.warnings.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it now (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for MemnodeChild {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `name` next to the current executable, one directory up, or else on PATH.
pub fn find_binary(name: &str) -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from(name)
}

/// A token no one can guess: 128 random bits from the kernel (`/dev/urandom`), in hex. (Falls
/// back to process id and clock, guessable, only where `/dev/urandom` cannot be read.)
pub fn fresh_token() -> String {
    let mut bytes = [0u8; 16];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes)) {
        Ok(()) => format!("rdmem-{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()),
        Err(e) => {
            tracing::warn!("cannot read /dev/urandom ({e}): the token is guessable");
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
            format!("rdmem-{}-{nanos:x}", std::process::id())
        }
    }
}

/// For programs that run on every machine of a test cluster at once (`soft-roce-setup/vm-cluster`
/// sets the variables; so can a batch system): which machine this is, where the others are,
/// and a rendezvous so that they can wait for each other without fixed sleeps.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    /// This machine's index, `0..ips.len()` (`RDMEM_NODE`).
    pub index: usize,
    /// Every machine's address, in index order (`RDMEM_NODE_IPS`).
    pub ips: Vec<String>,
}

impl ClusterNode {
    /// From `RDMEM_NODE`, `RDMEM_NODES` and `RDMEM_NODE_IPS`; an error saying what is missing
    /// outside a cluster.
    pub fn from_env() -> Result<Self, String> {
        let var = |name: &str| {
            std::env::var(name)
                .map_err(|_| format!("{name} is not set: run this on a cluster (soft-roce-setup/vm-cluster)"))
        };
        let index: usize = var("RDMEM_NODE")?.parse().map_err(|_| "RDMEM_NODE is not a number".to_owned())?;
        let nodes: usize = var("RDMEM_NODES")?.parse().map_err(|_| "RDMEM_NODES is not a number".to_owned())?;
        let ips: Vec<String> = var("RDMEM_NODE_IPS")?.split_whitespace().map(str::to_owned).collect();
        if ips.len() != nodes || index >= nodes {
            return Err(format!("RDMEM_NODE={index}, RDMEM_NODES={nodes} and {} addresses do not agree", ips.len()));
        }
        Ok(ClusterNode { index, ips })
    }

    /// Machines in the cluster.
    pub fn nodes(&self) -> usize {
        self.ips.len()
    }

    /// `HOST:PORT` of machine `k`.
    pub fn addr(&self, k: usize, port: u16) -> String {
        format!("{}:{port}", self.ips[k])
    }

    /// Waits until every machine in `members` (this one among them) has called this with the
    /// same `port`: the first member listens there, the others connect (retrying until it
    /// listens) and are answered once all are in. Fails after `timeout`.
    pub fn meet(&self, members: &[usize], port: u16, timeout: Duration) -> std::io::Result<()> {
        use std::io::{Read, Write};
        let leader = *members.first().ok_or_else(|| std::io::Error::other("no members"))?;
        let deadline = std::time::Instant::now() + timeout;
        let late =
            || std::io::Error::new(std::io::ErrorKind::TimedOut, format!("meeting on port {port}: not everyone came"));
        if self.index == leader {
            let listener = std::net::TcpListener::bind(("0.0.0.0", port))?;
            listener.set_nonblocking(true)?;
            let mut came = Vec::new();
            while came.len() + 1 < members.len() {
                match listener.accept() {
                    Ok((stream, _)) => came.push(stream),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if std::time::Instant::now() > deadline {
                            return Err(late());
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(e),
                }
            }
            for mut stream in came {
                stream.set_nonblocking(false)?;
                stream.write_all(b"go")?;
            }
            return Ok(());
        }
        let addr = self.addr(leader, port);
        loop {
            match std::net::TcpStream::connect(&addr) {
                Ok(mut stream) => {
                    let left =
                        deadline.saturating_duration_since(std::time::Instant::now()).max(Duration::from_millis(1));
                    stream.set_read_timeout(Some(left))?;
                    let mut go = [0u8; 2];
                    return stream.read_exact(&mut go).map_err(|_| late());
                }
                Err(_) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Err(_) => return Err(late()),
            }
        }
    }

    /// [`ClusterNode::meet`] of every machine.
    pub fn meet_all(&self, port: u16, timeout: Duration) -> std::io::Result<()> {
        let all: Vec<usize> = (0..self.nodes()).collect();
        self.meet(&all, port, timeout)
    }
}
