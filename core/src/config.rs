//! Cluster configuration: which memory nodes, which token, which device.
//!
//! Three sources, each overriding the one before: a TOML file, the environment, then flags
//! (each binary maps its flags onto [`ClusterConfig`]'s fields). The file:
//!
//! ```toml
//! token_file = "/etc/rdmem/token"   # or: token = "..."
//! tenant = "alice"                  # optional: the memory nodes' tenant ("default" if not given)
//! memnodes = ["10.0.0.1:7471", "10.0.0.2:7471"]
//!
//! [device]                          # optional: rdmem picks one itself
//! name = "mlx5_0"
//! port = 1
//! gid_index = 3
//! ```
//!
//! The environment: `RDMEM_CONFIG` (the file's path), `RDMEM_MEMNODES` (comma-separated
//! `host:port`), `RDMEM_TOKEN`, `RDMEM_TOKEN_FILE`, `RDMEM_TENANT`, and `RDMEM_DEVICE`, `RDMEM_PORT`,
//! `RDMEM_GID_INDEX` for the device.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// The port memory nodes listen on unless told otherwise.
pub const DEFAULT_PORT: u16 = 7471;

/// Which RDMA device, port and GID to use; `None` fields are chosen automatically.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Device name (`rxe0`, `mlx5_0`).
    pub name: Option<String>,
    /// Port number, 1-based.
    pub port: Option<u8>,
    /// GID table index.
    pub gid_index: Option<u32>,
}

/// Everything a compute process needs to reach the memory nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Memory nodes as `host:port` (port defaults to [`DEFAULT_PORT`]), in node order.
    #[serde(default)]
    pub memnodes: Vec<String>,
    /// The shared secret memory nodes ask for. Prefer `token_file`.
    pub token: Option<String>,
    /// A file holding the token (surrounding whitespace ignored).
    pub token_file: Option<PathBuf>,
    /// The tenant whose pools to use, on every memory node (`None`: the nodes' default pools).
    pub tenant: Option<String>,
    /// The RDMA device.
    #[serde(default)]
    pub device: DeviceConfig,
}

impl ClusterConfig {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::Config(e.to_string()))
    }

    /// The file named by `path` or else `RDMEM_CONFIG` (or defaults when neither is set), then
    /// the environment on top of it.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let from_env = std::env::var_os("RDMEM_CONFIG").filter(|p| !p.is_empty()).map(PathBuf::from);
        let mut config = match path.map(Path::to_path_buf).or(from_env) {
            Some(file) => Self::from_file(&file)?,
            None => Self::default(),
        };
        config.apply_env(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))?;
        Ok(config)
    }

    /// Overrides fields from variables read through `var` (the environment, or a map in tests).
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<()> {
        if let Some(list) = var("RDMEM_MEMNODES") {
            self.memnodes = list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
        }
        if let Some(token) = var("RDMEM_TOKEN") {
            self.token = Some(token);
            self.token_file = None;
        }
        if let Some(file) = var("RDMEM_TOKEN_FILE") {
            self.token_file = Some(file.into());
            self.token = None;
        }
        if let Some(tenant) = var("RDMEM_TENANT") {
            self.tenant = Some(tenant);
        }
        if let Some(name) = var("RDMEM_DEVICE") {
            self.device.name = Some(name);
        }
        let number = |name: &str| -> Result<Option<u32>> {
            var(name).map(|v| v.parse().map_err(|_| Error::Config(format!("{name}={v:?} is not a number")))).transpose()
        };
        if let Some(port) = number("RDMEM_PORT")? {
            self.device.port =
                Some(u8::try_from(port).map_err(|_| Error::Config(format!("RDMEM_PORT={port} is too large")))?);
        }
        if let Some(index) = number("RDMEM_GID_INDEX")? {
            self.device.gid_index = Some(index);
        }
        Ok(())
    }

    /// The token: `token`, else the contents of `token_file`, else empty (a memory node started
    /// without a token accepts only the empty one).
    pub fn resolve_token(&self) -> Result<String> {
        resolve_token(self.token.as_deref(), self.token_file.as_deref())
    }

    /// The memory node addresses with the default port filled in where missing.
    pub fn memnode_addrs(&self) -> Result<Vec<String>> {
        if self.memnodes.is_empty() {
            return Err(Error::Config(
                "no memory nodes: set memnodes in the config file, RDMEM_MEMNODES, or --memnode".into(),
            ));
        }
        self.memnodes.iter().map(|m| with_default_port(m)).collect()
    }
}

/// The token from a literal or a file (surrounding whitespace ignored); empty when neither.
pub fn resolve_token(token: Option<&str>, file: Option<&Path>) -> Result<String> {
    match (token, file) {
        (Some(t), _) => Ok(t.to_owned()),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map(|t| t.trim().to_owned())
            .map_err(|e| Error::Config(format!("cannot read token file {}: {e}", path.display()))),
        (None, None) => Ok(String::new()),
    }
}

/// `host:port` from `host` or `host:port`; IPv6 literals go in brackets (`[fe80::1]:7471`).
fn with_default_port(addr: &str) -> Result<String> {
    let addr = addr.trim();
    if addr.is_empty() {
        return Err(Error::Config("empty memory node address".into()));
    }
    // A port follows the last ':' unless that ':' is inside an IPv6 literal.
    let has_port = match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && (!host.contains(':') || host.ends_with(']')) => {
            port.parse::<u16>().map_err(|_| Error::Config(format!("bad port in memory node address {addr:?}")))?;
            true
        }
        _ => false,
    };
    Ok(if has_port { addr.to_owned() } else { format!("{addr}:{DEFAULT_PORT}") })
}

/// Parses a size in bytes: a number with an optional K, M or G suffix (powers of 1024), above
/// zero (the `--pool-size` flags).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 10),
        Some('M') => (&s[..s.len() - 1], 20),
        Some('G') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("size {s:?}: use a number with an optional K, M or G suffix"))?;
    let bytes = n.checked_shl(shift).filter(|b| b >> shift == n).ok_or_else(|| format!("size {s:?} is too large"))?;
    if bytes == 0 {
        return Err("the pool size must be above zero".into());
    }
    Ok(bytes)
}

/// Parses a duration: a whole number with a unit, `ms`, `s`, `m` or `h` (`30s`, `5m`), above
/// zero (the `--checkpoint-every` flag).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let usage = || format!("duration {s:?}: use a whole number and a unit, ms, s, m or h (e.g. 30s)");
    let n: u64 = digits.parse().map_err(|_| usage())?;
    let millis = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(usage()),
    };
    match millis {
        Some(0) => Err("the duration must be above zero".into()),
        Some(ms) => Ok(std::time::Duration::from_millis(ms)),
        None => Err(format!("duration {s:?} is too long")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn durations() {
        use std::time::Duration;
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        for bad in ["", "30", "s", "1.5s", "-1s", "10 days", "0s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert!(parse_duration("99999999999999999h").unwrap_err().contains("too long"));
    }

    #[test]
    fn file_then_environment() {
        let mut config = ClusterConfig::from_toml(
            r#"
            token = "from-file"
            tenant = "alice"
            memnodes = ["10.0.0.1", "10.0.0.2:9000"]
            [device]
            name = "mlx5_0"
            "#,
        )
        .unwrap();
        assert_eq!(config.memnode_addrs().unwrap(), vec!["10.0.0.1:7471", "10.0.0.2:9000"]);
        assert_eq!(config.device.name.as_deref(), Some("mlx5_0"));
        assert_eq!(config.tenant.as_deref(), Some("alice"));

        let env: HashMap<&str, &str> = [
            ("RDMEM_MEMNODES", "a:1, b"),
            ("RDMEM_TOKEN", "from-env"),
            ("RDMEM_GID_INDEX", "3"),
            ("RDMEM_TENANT", "bob"),
        ]
        .into();
        config.apply_env(|k| env.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(config.memnode_addrs().unwrap(), vec!["a:1", "b:7471"]);
        assert_eq!(config.resolve_token().unwrap(), "from-env");
        assert_eq!(config.device.gid_index, Some(3));
        assert_eq!(config.tenant.as_deref(), Some("bob"));
    }

    #[test]
    fn bad_inputs_say_what_is_wrong() {
        let err = ClusterConfig::from_toml("memnode = []").unwrap_err().to_string();
        assert!(err.contains("unknown field"), "{err}");
        let err = ClusterConfig::default().memnode_addrs().unwrap_err().to_string();
        assert!(err.contains("no memory nodes"), "{err}");
        let mut config = ClusterConfig::default();
        let err = config.apply_env(|k| (k == "RDMEM_PORT").then(|| "x".into())).unwrap_err().to_string();
        assert!(err.contains("RDMEM_PORT"), "{err}");
        let err = with_default_port("host:notaport").unwrap_err().to_string();
        assert!(err.contains("bad port"), "{err}");
        let err = resolve_token(None, Some(Path::new("/nonexistent/token"))).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/token"), "{err}");
    }

    #[test]
    fn ipv6_literals() {
        assert_eq!(with_default_port("[fe80::1]").unwrap(), "[fe80::1]:7471");
        assert_eq!(with_default_port("[fe80::1]:80").unwrap(), "[fe80::1]:80");
    }
}
