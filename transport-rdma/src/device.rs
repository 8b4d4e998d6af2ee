//! Opening an RDMA device: which device, which port, which GID.
//!
//! [`Device::open`] picks what just works on Soft-RoCE (rxe), RoCE NICs and InfiniBand HCAs:
//! - the device named by [`DeviceSelection::name`] (flag or `RDMEM_DEVICE`), else the only
//!   device, else the first one with an active port;
//! - port 1 unless told otherwise; the port must be `ACTIVE`;
//! - on Ethernet (RoCE) the RoCE v2 GID holding an IPv4-mapped address, then any RoCE v2 GID
//!   that is not link-local, then RoCE v1; on InfiniBand GID 0 and the port's LID. An explicit
//!   index (`RDMEM_GID_INDEX`) wins.
//!
//! Every failure is a [`DeviceError`] that says what is missing and what to do about it.

use std::io;
use std::sync::Arc;

use sideway::ibverbs::address::{Gid, GidEntry, GidType};
use sideway::ibverbs::device::{DeviceInfo, DeviceList, GetDeviceListErrorKind};
use sideway::ibverbs::device_context::{DeviceContext, LinkLayer, PortState};

/// Which device, port and GID to use. `Default` means "pick automatically".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceSelection {
    /// Device name as `ibv_devices` prints it (e.g. `rxe0`, `mlx5_0`).
    pub name: Option<String>,
    /// Port number, 1-based. `None` means port 1.
    pub port: Option<u8>,
    /// GID table index. `None` means the best one for the link layer.
    pub gid_index: Option<u32>,
}

impl DeviceSelection {
    /// The selection given by the environment: `RDMEM_DEVICE`, `RDMEM_PORT` and
    /// `RDMEM_GID_INDEX` (each optional; an empty variable counts as unset).
    pub fn from_env() -> Result<Self, DeviceError> {
        fn var(name: &'static str) -> Option<String> {
            std::env::var(name).ok().filter(|v| !v.is_empty())
        }
        fn number<T: std::str::FromStr>(name: &'static str) -> Result<Option<T>, DeviceError> {
            var(name).map(|v| v.parse().map_err(|_| DeviceError::BadVariable { name, value: v.clone() })).transpose()
        }
        Ok(Self { name: var("RDMEM_DEVICE"), port: number("RDMEM_PORT")?, gid_index: number("RDMEM_GID_INDEX")? })
    }
}

/// Why a device could not be opened. Each message says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// `ibv_get_device_list` failed with ENOSYS: the kernel was built without RDMA support.
    #[error(
        "this kernel has no RDMA support (ibv_get_device_list: {0}); run inside the Soft-RoCE VM \
         with soft-roce-setup/vm-run, or use a kernel with CONFIG_INFINIBAND"
    )]
    KernelLacksRdma(#[source] io::Error),
    /// `ibv_get_device_list` failed for another reason.
    #[error("cannot list RDMA devices (ibv_get_device_list): {0}")]
    List(#[source] io::Error),
    /// The device list is empty.
    #[error(
        "no RDMA device found; on a host whose kernel has rdma_rxe run soft-roce-setup/setup-host, \
         otherwise soft-roce-setup/vm-run (soft-roce-setup/doctor tells which)"
    )]
    NoDevice,
    /// No device has the requested name.
    #[error("no RDMA device named {name:?}; present: {present}")]
    NotFound {
        /// The requested name.
        name: String,
        /// The devices that are present, comma separated.
        present: String,
    },
    /// `ibv_open_device` failed.
    #[error("cannot open RDMA device {device} (ibv_open_device): {source}")]
    Open {
        /// The device name.
        device: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// `ibv_query_device`, `ibv_query_port` or `ibv_query_gid` failed.
    #[error("cannot query RDMA device {device}: {what}")]
    Query {
        /// The device name.
        device: String,
        /// What failed, with the verb's own message.
        what: String,
    },
    /// The port number is not on the device.
    #[error("RDMA device {device} has {ports} port(s); port {port} does not exist")]
    NoSuchPort {
        /// The device name.
        device: String,
        /// The requested port.
        port: u8,
        /// How many ports the device has.
        ports: u8,
    },
    /// The port is not `ACTIVE`.
    #[error(
        "port {port} of RDMA device {device} is {state}, not ACTIVE; check the link \
         (for rxe: is its netdev up?)"
    )]
    PortNotActive {
        /// The device name.
        device: String,
        /// The port number.
        port: u8,
        /// The state the port is in.
        state: String,
    },
    /// No GID fits (none configured, or the requested index is empty).
    #[error("port {port} of RDMA device {device} has no usable GID{detail}")]
    NoGid {
        /// The device name.
        device: String,
        /// The port number.
        port: u8,
        /// More about what was looked for.
        detail: String,
    },
    /// An `RDMEM_*` variable does not parse.
    #[error("environment variable {name}={value:?} is not a number")]
    BadVariable {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
    },
}

/// An opened device, with the port and GID it will be used through.
#[derive(Clone)]
pub struct Device {
    context: Arc<DeviceContext>,
    name: String,
    port: u8,
    gid: Gid,
    gid_index: u32,
    lid: u16,
    link_layer: LinkLayer,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("name", &self.name)
            .field("port", &self.port)
            .field("gid_index", &self.gid_index)
            .field("gid", &self.gid.to_string())
            .field("lid", &self.lid)
            .finish()
    }
}

impl Device {
    /// Opens the device, port and GID that `selection` asks for (see the module docs).
    pub fn open(selection: &DeviceSelection) -> Result<Self, DeviceError> {
        let list = DeviceList::new().map_err(|e| {
            let io = match e.0 {
                GetDeviceListErrorKind::Ibverbs(io) => io,
                other => io::Error::other(other.to_string()),
            };
            // ENOSYS: libibverbs found no RDMA subsystem in the kernel.
            if io.kind() == io::ErrorKind::Unsupported {
                DeviceError::KernelLacksRdma(io)
            } else {
                DeviceError::List(io)
            }
        })?;
        if list.is_empty() {
            return Err(DeviceError::NoDevice);
        }
        let names: Vec<String> = list.iter().map(|d| d.name()).collect();
        let port = selection.port.unwrap_or(1);
        let chosen = match &selection.name {
            Some(name) => names
                .iter()
                .position(|n| n == name)
                .ok_or_else(|| DeviceError::NotFound { name: name.clone(), present: names.join(", ") })?,
            None if names.len() == 1 => 0,
            // Several devices: the first whose port is active, else the first (which then fails
            // with a message about its port).
            None => (0..names.len())
                .find(|&i| {
                    list.get(i)
                        .and_then(|d| d.open().ok())
                        .and_then(|ctx| ctx.query_port(port).ok())
                        .is_some_and(|attr| attr.port_state() == PortState::Active)
                })
                .unwrap_or(0),
        };
        let name = names[chosen].clone();
        let device = list.get(chosen).ok_or(DeviceError::NoDevice)?;
        let context =
            device.open().map_err(|e| DeviceError::Open { device: name.clone(), source: io::Error::other(e.0) })?;
        Self::with_context(context, name, port, selection.gid_index)
    }

    fn with_context(
        context: Arc<DeviceContext>,
        name: String,
        port: u8,
        gid_index: Option<u32>,
    ) -> Result<Self, DeviceError> {
        let query = |what: String| DeviceError::Query { device: name.clone(), what };
        let ports = context.query_device().map_err(|e| query(format!("ibv_query_device: {e}")))?.phys_port_cnt();
        if port == 0 || port > ports {
            return Err(DeviceError::NoSuchPort { device: name, port, ports });
        }
        let attr = context.query_port(port).map_err(|e| query(format!("ibv_query_port: {e}")))?;
        if attr.port_state() != PortState::Active {
            return Err(DeviceError::PortNotActive { device: name, port, state: format!("{:?}", attr.port_state()) });
        }
        let link_layer = attr.link_layer();
        let no_gid = |detail: String| DeviceError::NoGid { device: name.clone(), port, detail };
        let (gid, gid_index) = match gid_index {
            Some(index) => {
                let gid = context.query_gid(port, index).map_err(|e| no_gid(format!(" at index {index}: {e}")))?;
                if gid.is_zero() {
                    return Err(no_gid(format!(": index {index} is empty")));
                }
                (gid, index)
            }
            None => {
                let table = context.query_gid_table().map_err(|e| query(format!("ibv_query_gid_table: {e}")))?;
                let entry = best_gid(&table, port, link_layer == LinkLayer::InfiniBand)
                    .ok_or_else(|| no_gid(" (for RoCE: give its netdev an IP address)".to_owned()))?;
                (entry.gid(), entry.gid_index())
            }
        };
        Ok(Self { context, name, port, gid, gid_index, lid: attr.lid(), link_layer })
    }

    /// The verbs context, for creating protection domains, queues and queue pairs.
    pub fn context(&self) -> &Arc<DeviceContext> {
        &self.context
    }

    /// The device name (e.g. `rxe0`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The port in use (1-based).
    pub fn port(&self) -> u8 {
        self.port
    }

    /// The GID in use.
    pub fn gid(&self) -> Gid {
        self.gid
    }

    /// The IPv4 address of the GID in use, when it is a RoCE v2 GID of one (`::ffff:a.b.c.d`):
    /// the address RDMA-CM reaches this device at.
    pub fn ipv4(&self) -> Option<std::net::Ipv4Addr> {
        let raw = self.gid.raw;
        (raw[..10].iter().all(|&b| b == 0) && raw[10..12] == [0xff, 0xff])
            .then(|| std::net::Ipv4Addr::new(raw[12], raw[13], raw[14], raw[15]))
    }

    /// `addr`, with a loopback IP replaced by this device's own ([`Device::ipv4`]): RDMA-CM
    /// cannot route over `lo`, so `127.0.0.1` stands for this machine's RDMA address (a node
    /// listening on `127.0.0.1` listens there, a client connecting to it connects there).
    pub fn routable(&self, addr: std::net::SocketAddr) -> std::net::SocketAddr {
        match self.ipv4() {
            Some(ip) if addr.ip().is_loopback() => std::net::SocketAddr::from((ip, addr.port())),
            _ => addr,
        }
    }

    /// The index of the GID in use.
    pub fn gid_index(&self) -> u32 {
        self.gid_index
    }

    /// The port's LID (InfiniBand only; 0 on RoCE).
    pub fn lid(&self) -> u16 {
        self.lid
    }

    /// True when the port is InfiniBand, false for Ethernet (RoCE, rxe).
    pub fn is_infiniband(&self) -> bool {
        self.link_layer == LinkLayer::InfiniBand
    }
}

/// The GID to use on `port`: GID 0 on InfiniBand; on RoCE, by preference, RoCE v2 with an
/// IPv4-mapped address, RoCE v2 not link-local, then RoCE v1.
fn best_gid(table: &[GidEntry], port: u8, infiniband: bool) -> Option<&GidEntry> {
    let on_port = || table.iter().filter(move |e| e.port_num() == u32::from(port) && !e.gid().is_zero());
    if infiniband {
        return on_port().find(|e| e.gid_type() == GidType::InfiniBand);
    }
    let ipv4_mapped = |e: &&GidEntry| std::net::Ipv6Addr::from(e.gid()).to_ipv4_mapped().is_some();
    let v2 = |e: &&GidEntry| e.gid_type() == GidType::RoceV2;
    on_port()
        .find(|e| v2(e) && ipv4_mapped(e))
        .or_else(|| on_port().find(|e| v2(e) && !e.gid().is_unicast_link_local()))
        .or_else(|| on_port().find(|e| e.gid_type() == GidType::RoceV1))
}
