//! Starting `rdmem-memnode` as a child process, for programs that bring their own memory node:
//! the launcher (`rdmem-run`), benchmarks, examples and the device tests. Not part of the data
//! path; nothing in the library uses it.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::error::RdmaError;

/// A `rdmem-memnode` child process listening on 127.0.0.1, killed when dropped.
pub struct MemnodeChild {
    child: Child,
    addr: String,
    token: String,
}

impl MemnodeChild {
    /// Starts `rdmem-memnode` with `--listen 127.0.0.1:<free port>`, `token` and `args`,
    /// and waits until it serves. The binary is looked for next to the current executable, one
    /// directory up (test binaries live in `target/*/deps`), then on PATH. Its warnings and
    /// errors are passed on to stderr, prefixed with `name`.
    pub fn start(name: &str, token: &str, args: &[&str]) -> Result<Self, RdmaError> {
        let program = find_binary("rdmem-memnode");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| RdmaError::io("picking a free port", e))?
            .port();
        let addr = format!("127.0.0.1:{port}");
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
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("serving node") {
                    let _ = ready_tx.send(());
                } else if line.contains("WARN") || line.contains("ERROR") || line.contains("error:") {
                    eprintln!("[{name}] {line}");
                }
            }
        });
        if ready_rx.recv_timeout(Duration::from_secs(60)).is_err() {
            let _ = child.kill();
            let status = child.wait().map_err(|e| RdmaError::io("waiting for rdmem-memnode", e))?;
            return Err(RdmaError::io(
                format!("{} did not start ({status}); its errors are above", program.display()),
                std::io::Error::other("memory node failed to start"),
            ));
        }
        Ok(MemnodeChild { child, addr, token })
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The token it asks for.
    pub fn token(&self) -> &str {
        &self.token
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
