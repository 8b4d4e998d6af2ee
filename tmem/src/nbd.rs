//! A small NBD server (the newstyle protocol, fixed handshake) whose export is one object of a
//! persistent page-store pool, so that Linux can swap to remote memory through `nbd-client`.
//!
//! Written here rather than taken from a crate: the NBD crates on crates.io serve files or
//! implement only the old handshake, and what swap needs is small (the handshake with
//! `NBD_OPT_GO`/`NBD_OPT_EXPORT_NAME`, then READ, WRITE, FLUSH, TRIM, WRITE_ZEROES and DISC
//! with simple replies), with the I/O path written against the page store: each 4 KiB page of
//! the export is one page of the store (a page never written, or trimmed, reads as zeros and
//! takes no space). Writes that do not cover whole pages are read, patched and put again.
//!
//! Every connection is served by its own thread with its own [`StoreHandle`] and one buffer,
//! allocated when the connection starts and grown only for a request larger than any before
//! (at most [`MAX_REQUEST`]). A request the protocol does not allow (bad magic, a range past
//! the end, an oversized length) gets an error reply or ends the connection; it never takes
//! the server down.

use std::io::{self, Read, Write};
use std::time::Duration;

use rdmem_core::Transport;

use crate::error::TmemError;
use crate::page::{PAGE_SIZE, Page};
use crate::store::{PoolId, StoreHandle};

/// The largest READ or WRITE served (the Linux client sends at most 32 MiB).
pub const MAX_REQUEST: u32 = 32 << 20;

/// The longest an option of the handshake may be (an export name and a few info requests).
const MAX_OPTION: u32 = 4096;

/// How long a client may take over the handshake before it is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const CLIENT_NO_ZEROES: u32 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TF_HAS_FLAGS: u16 = 1;
const TF_SEND_FLUSH: u16 = 4;
const TF_SEND_FUA: u16 = 8;
const TF_SEND_TRIM: u16 = 32;
const TF_SEND_WRITE_ZEROES: u16 = 64;
// No NBD_FLAG_CAN_MULTI_CONN: a write of part of a page is a read, a patch and a put, which
// is atomic within a connection (its requests are served in order) but not across them.
const TRANSMISSION_FLAGS: u16 = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;

const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// What a server exports: one object of a persistent pool, `size` bytes (a multiple of 4 KiB).
#[derive(Clone, Debug)]
pub struct Export {
    /// The export's name (clients that ask for another are refused; the empty name, the
    /// default export, is this one too).
    pub name: String,
    /// The pool (persistent: a page written is never lost).
    pub pool: PoolId,
    /// The object in the pool whose pages are the export's.
    pub object: u64,
    /// The export's size in bytes.
    pub size: u64,
}

impl Export {
    /// Checks the size: a multiple of the page size, at most 2^32 pages.
    pub fn check(&self) -> crate::Result<()> {
        if self.size == 0 || self.size % PAGE_SIZE as u64 != 0 || self.size / PAGE_SIZE as u64 > 1 << 32 {
            return Err(TmemError::InvalidOptions(format!(
                "an export of {} bytes: it must be a non-zero multiple of {PAGE_SIZE} bytes, at most 16 TiB",
                self.size
            )));
        }
        Ok(())
    }
}

/// How a connection ended.
#[derive(Debug)]
pub enum Ended {
    /// The client sent `NBD_CMD_DISC` or `NBD_OPT_ABORT`, or closed the socket between requests.
    Disconnected,
    /// The client broke the protocol (the reason); the connection was closed.
    ProtocolError(String),
}

/// Counters of one connection.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnectionStats {
    /// READ requests, and bytes read.
    pub reads: u64,
    /// See `reads`.
    pub read_bytes: u64,
    /// WRITE requests, and bytes written.
    pub writes: u64,
    /// See `writes`.
    pub write_bytes: u64,
    /// TRIM and WRITE_ZEROES requests.
    pub trims: u64,
    /// Requests answered with an error.
    pub errors: u64,
}

/// Serves one client on `stream` (a unix or TCP socket) until it disconnects: the
/// [`handshake`], then its requests ([`transmission`]). I/O errors of the socket end it with
/// `Err`. A server that bounds the handshake's time sets a read timeout on the socket, calls
/// the two itself and clears it in between.
pub fn serve<T: Transport, S: Read + Write>(
    stream: &mut S,
    handle: &mut StoreHandle<T>,
    export: &Export,
    stats: &mut ConnectionStats,
) -> io::Result<Ended> {
    match handshake(stream, export)? {
        Some(ended) => Ok(ended),
        None => transmission(stream, handle, export, stats),
    }
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn option_reply(w: &mut impl Write, option: u32, reply: u32, data: &[u8]) -> io::Result<()> {
    let mut m = Vec::with_capacity(20 + data.len());
    m.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&reply.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    w.write_all(&m)
}

/// The fixed newstyle handshake. `None` when it ends in transmission, else how it ended.
pub fn handshake<S: Read + Write>(s: &mut S, export: &Export) -> io::Result<Option<Ended>> {
    let mut hello = [0u8; 18];
    hello[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    hello[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    hello[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let client_flags = read_u32(s)?;
    if client_flags & !3 != 0 {
        return Ok(Some(Ended::ProtocolError(format!("unknown client flags {client_flags:#x}"))));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
    let mut data = Vec::new();
    loop {
        let magic = read_u64(s)?;
        if magic != IHAVEOPT {
            return Ok(Some(Ended::ProtocolError(format!("option magic {magic:#x}, expected IHAVEOPT"))));
        }
        let option = read_u32(s)?;
        let len = read_u32(s)?;
        if len > MAX_OPTION {
            return Ok(Some(Ended::ProtocolError(format!("option {option} of {len} bytes (at most {MAX_OPTION})"))));
        }
        data.resize(len as usize, 0);
        s.read_exact(&mut data)?;
        match option {
            OPT_EXPORT_NAME => {
                if !names_this(export, &data) {
                    // This option has no error reply: the only answer is to hang up.
                    return Ok(Some(Ended::ProtocolError(format!(
                        "export {:?} asked for; this server exports {:?}",
                        String::from_utf8_lossy(&data),
                        export.name
                    ))));
                }
                let mut m = Vec::with_capacity(10 + 124);
                m.extend_from_slice(&export.size.to_be_bytes());
                m.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                if !no_zeroes {
                    m.extend_from_slice(&[0; 124]);
                }
                s.write_all(&m)?;
                return Ok(None);
            }
            OPT_ABORT => {
                option_reply(s, option, REP_ACK, &[])?;
                return Ok(Some(Ended::Disconnected));
            }
            OPT_INFO | OPT_GO => {
                let name = match parse_info_request(&data) {
                    Ok(name) => name,
                    Err(why) => {
                        option_reply(s, option, REP_ERR_INVALID, why.as_bytes())?;
                        continue;
                    }
                };
                if !names_this(export, name) {
                    option_reply(s, option, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                }
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&export.size.to_be_bytes());
                info.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                option_reply(s, option, REP_INFO, &info)?;
                let mut block = Vec::with_capacity(14);
                block.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                block.extend_from_slice(&1u32.to_be_bytes());
                block.extend_from_slice(&(PAGE_SIZE as u32).to_be_bytes());
                block.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                option_reply(s, option, REP_INFO, &block)?;
                option_reply(s, option, REP_ACK, &[])?;
                if option == OPT_GO {
                    return Ok(None);
                }
            }
            _ => option_reply(s, option, REP_ERR_UNSUP, b"not supported by rdmem-swap")?,
        }
    }
}

fn names_this(export: &Export, name: &[u8]) -> bool {
    name.is_empty() || name == export.name.as_bytes()
}

/// The export name of an `NBD_OPT_INFO`/`NBD_OPT_GO` (u32 length, name, u16 count, u16 each).
fn parse_info_request(data: &[u8]) -> Result<&[u8], &'static str> {
    let len = data.get(..4).ok_or("truncated name length")?;
    let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
    let name = data.get(4..4usize.checked_add(len).ok_or("name length overflows")?).ok_or("truncated name")?;
    let rest = &data[4 + len..];
    let count = rest.get(..2).ok_or("truncated info request count")?;
    let count = u16::from_be_bytes(count.try_into().expect("2 bytes")) as usize;
    if rest.len() != 2 + 2 * count {
        return Err("info request count does not match the option's length");
    }
    Ok(name)
}

/// Serves requests until the client disconnects (after a [`handshake`] that returned `None`).
pub fn transmission<T: Transport, S: Read + Write>(
    s: &mut S,
    handle: &mut StoreHandle<T>,
    export: &Export,
    stats: &mut ConnectionStats,
) -> io::Result<Ended> {
    // The reply header's 16 bytes, then a READ's data: one write per reply.
    let mut buf: Vec<u8> = vec![0; 16 + 128 * 1024];
    let mut page: Page = [0; PAGE_SIZE];
    loop {
        let mut header = [0u8; 28];
        match s.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Ended::Disconnected),
            Err(e) => return Err(e),
        }
        let magic = u32::from_be_bytes(header[0..4].try_into().expect("4"));
        let kind = u16::from_be_bytes(header[6..8].try_into().expect("2"));
        let cookie = &header[8..16];
        let offset = u64::from_be_bytes(header[16..24].try_into().expect("8"));
        let len = u32::from_be_bytes(header[24..28].try_into().expect("4"));
        if magic != REQUEST_MAGIC {
            return Ok(Ended::ProtocolError(format!("request magic {magic:#x}")));
        }
        let in_range = offset.checked_add(u64::from(len)).is_some_and(|end| end <= export.size);
        if kind == CMD_WRITE {
            // Its data comes whatever the verdict: take it off the socket first.
            if len > MAX_REQUEST {
                return Ok(Ended::ProtocolError(format!("a WRITE of {len} bytes (at most {MAX_REQUEST})")));
            }
            grow(&mut buf, len);
            s.read_exact(&mut buf[16..16 + len as usize])?;
        }
        let error = match kind {
            CMD_DISC => return Ok(Ended::Disconnected),
            CMD_WRITE | CMD_WRITE_ZEROES if !in_range => ENOSPC, // as the spec asks
            _ if !in_range => EINVAL,
            CMD_READ if len > MAX_REQUEST => EINVAL,
            CMD_READ => {
                grow(&mut buf, len);
                stats.reads += 1;
                stats.read_bytes += u64::from(len);
                code(read_range(handle, export, offset, &mut buf[16..16 + len as usize], &mut page))
            }
            CMD_WRITE => {
                stats.writes += 1;
                stats.write_bytes += u64::from(len);
                code(write_range(handle, export, offset, Some(&buf[16..16 + len as usize]), len, &mut page))
            }
            CMD_TRIM => {
                stats.trims += 1;
                code(trim_range(handle, export, offset, len))
            }
            CMD_WRITE_ZEROES => {
                stats.trims += 1;
                code(write_range(handle, export, offset, None, len, &mut page))
            }
            // Everything written is in the store when its reply goes out: nothing to flush.
            CMD_FLUSH => 0,
            _ => EINVAL,
        };
        stats.errors += (error != 0) as u64;
        buf[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        buf[4..8].copy_from_slice(&error.to_be_bytes());
        buf[8..16].copy_from_slice(cookie);
        let data = if kind == CMD_READ && error == 0 { len as usize } else { 0 };
        s.write_all(&buf[..16 + data])?;
    }
}

fn grow(buf: &mut Vec<u8>, len: u32) {
    if buf.len() < 16 + len as usize {
        buf.resize(16 + len as usize, 0);
    }
}

/// The NBD error for a store error.
fn code(r: crate::Result<()>) -> u32 {
    match r {
        Ok(()) => 0,
        Err(TmemError::Full { .. }) => ENOSPC,
        Err(e) => {
            tracing::warn!("rdmem-swap: {e}");
            EIO
        }
    }
}

/// The export's pages a byte range covers: (page index, offset in it, length).
fn pages(offset: u64, len: u32) -> impl Iterator<Item = (u32, usize, usize)> {
    let end = offset + u64::from(len);
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let index = (at / PAGE_SIZE as u64) as u32;
        let within = (at % PAGE_SIZE as u64) as usize;
        let n = (PAGE_SIZE - within).min((end - at) as usize);
        at += n as u64;
        Some((index, within, n))
    })
}

fn read_range<T: Transport>(
    handle: &mut StoreHandle<T>,
    export: &Export,
    offset: u64,
    out: &mut [u8],
    page: &mut Page,
) -> crate::Result<()> {
    let mut at = 0;
    for (index, within, n) in pages(offset, out.len() as u32) {
        let target = &mut out[at..at + n];
        if n == PAGE_SIZE {
            let target: &mut Page = target.try_into().expect("a page");
            if !handle.get(export.pool, export.object, index, target)? {
                target.fill(0);
            }
        } else if handle.get(export.pool, export.object, index, page)? {
            target.copy_from_slice(&page[within..within + n]);
        } else {
            target.fill(0);
        }
        at += n;
    }
    Ok(())
}

/// TRIM: the whole pages of the range are flushed (they take no space and read as zeros); the
/// parts of pages at its ends are left as they are (a trim is a hint).
fn trim_range<T: Transport>(handle: &mut StoreHandle<T>, export: &Export, offset: u64, len: u32) -> crate::Result<()> {
    for (index, _, n) in pages(offset, len) {
        if n == PAGE_SIZE {
            handle.flush_page(export.pool, export.object, index)?;
        }
    }
    Ok(())
}

/// Writes `data` (or zeros, for WRITE_ZEROES: whole pages are flushed, so they take no space
/// and read as zeros) over `len` bytes at `offset`.
fn write_range<T: Transport>(
    handle: &mut StoreHandle<T>,
    export: &Export,
    offset: u64,
    data: Option<&[u8]>,
    len: u32,
    page: &mut Page,
) -> crate::Result<()> {
    let mut at = 0;
    for (index, within, n) in pages(offset, len) {
        match data {
            Some(data) if n == PAGE_SIZE => {
                let src: &Page = data[at..at + n].try_into().expect("a page");
                handle.put(export.pool, export.object, index, src)?;
            }
            None if n == PAGE_SIZE => {
                handle.flush_page(export.pool, export.object, index)?;
            }
            _ => {
                if !handle.get(export.pool, export.object, index, page)? {
                    page.fill(0);
                }
                match data {
                    Some(data) => page[within..within + n].copy_from_slice(&data[at..at + n]),
                    None => page[within..within + n].fill(0),
                }
                handle.put(export.pool, export.object, index, page)?;
            }
        }
        at += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_into_pages() {
        let v: Vec<_> = pages(4096 * 2 + 100, 8192).collect();
        assert_eq!(v, vec![(2, 100, 3996), (3, 0, 4096), (4, 0, 100)]);
        assert_eq!(pages(0, 0).count(), 0);
        assert_eq!(pages(4096, 4096).collect::<Vec<_>>(), vec![(1, 0, 4096)]);
    }

    #[test]
    fn info_requests_are_checked() {
        let mut d = vec![0, 0, 0, 5];
        d.extend_from_slice(b"rdmem");
        d.extend_from_slice(&[0, 1, 0, 3]);
        assert_eq!(parse_info_request(&d), Ok(&b"rdmem"[..]));
        assert!(parse_info_request(&d[..d.len() - 1]).is_err());
        assert!(parse_info_request(&[0xFF, 0xFF, 0xFF, 0xFF, 0, 0]).is_err());
        assert!(parse_info_request(&[]).is_err());
    }
}
