//! Registered memory: anonymous mappings on huge pages, registered with a protection domain.
//!
//! A [`Region`] owns its mapping and its memory region (MR); the MR is deregistered before the
//! mapping is unmapped (field order). Huge pages are asked for first; when the kernel has none
//! to give (`vm.nr_hugepages` too low) the region falls back to normal pages and logs a warning,
//! because a pool on normal pages works, only with more TLB misses on the device.
//! Registration pins the memory, which counts against the memlock limit: when it fails, the
//! error says what the limit is and how to raise it.

use std::io;
use std::sync::Arc;

use memmap2::{MmapMut, MmapOptions};
use sideway::ibverbs::AccessFlags;
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;

use rdmem_core::Resource;

use crate::error::RdmaError;

/// The page size backing a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageSize {
    /// 2 MiB huge pages (the default for pools).
    Huge2M,
    /// 1 GiB huge pages.
    Huge1G,
    /// Normal 4 KiB pages.
    Normal,
}

impl PageSize {
    /// The page size in bytes.
    pub fn bytes(self) -> usize {
        match self {
            PageSize::Huge2M => 2 << 20,
            PageSize::Huge1G => 1 << 30,
            PageSize::Normal => 4096,
        }
    }

    fn log2(self) -> Option<u8> {
        match self {
            PageSize::Huge2M => Some(21),
            PageSize::Huge1G => Some(30),
            PageSize::Normal => None,
        }
    }
}

impl std::str::FromStr for PageSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "2m" | "2mib" => Ok(PageSize::Huge2M),
            "1g" | "1gib" => Ok(PageSize::Huge1G),
            "none" | "4k" | "normal" => Ok(PageSize::Normal),
            _ => Err(format!("page size {s:?}: use 2M, 1G or none")),
        }
    }
}

/// Why memory could not be mapped or registered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemoryError {
    /// A zero-length region was asked for.
    #[error("cannot register an empty region")]
    Empty,
    /// `mmap` failed even with normal pages.
    #[error("cannot map {len} bytes: {source}")]
    Map {
        /// Bytes asked for.
        len: usize,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// `ibv_reg_mr` failed.
    #[error("cannot register {len} bytes with the device (ibv_reg_mr): {reason}")]
    Register {
        /// Bytes asked for.
        len: usize,
        /// What failed.
        reason: String,
    },
    /// `ibv_reg_mr` failed, and the memlock limit is below what it had to pin.
    #[error(
        "cannot register {needed} bytes with the device (ibv_reg_mr: {reason}): the memlock limit is {} KiB, \
         below the {} KiB to register; raise it with `ulimit -l unlimited` or /etc/security/limits.d \
         (`* - memlock unlimited`)",
        limit / 1024,
        needed.div_ceil(1024)
    )]
    MemlockLimit {
        /// Bytes to register.
        needed: u64,
        /// The soft memlock limit in bytes.
        limit: u64,
        /// What the verb said.
        reason: String,
    },
}

/// Registered memory: a mapping and its memory region.
pub struct Region {
    // Deregistered before unmapped: fields drop in declaration order.
    mr: Arc<MemoryRegion>,
    map: MmapMut,
    page_size: PageSize,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region").field("len", &self.len()).field("page_size", &self.page_size).finish()
    }
}

impl Region {
    /// Maps `len` bytes (rounded up to whole pages) on `page_size` pages, falling back to normal
    /// pages with a warning when no huge pages are available, and registers them with `access`.
    pub fn new(
        pd: &Arc<ProtectionDomain>,
        len: usize,
        page_size: PageSize,
        access: AccessFlags,
    ) -> Result<Self, MemoryError> {
        if len == 0 {
            return Err(MemoryError::Empty);
        }
        let (map, page_size) = map_anonymous(len, page_size)?;
        let ptr = map.as_ptr() as usize;
        let map_len = map.len();
        // SAFETY: the mapping lives as long as the region (the MR is dropped first, see the
        // field order), and it is only touched through `&self`/`&mut self` of this region.
        let mr = unsafe { pd.reg_mr(ptr, map_len, access) }.map_err(|e| match memlock_limit() {
            Some(limit) if limit < map_len as u64 => {
                MemoryError::MemlockLimit { needed: map_len as u64, limit, reason: e.to_string() }
            }
            _ => MemoryError::Register { len: map_len, reason: e.to_string() },
        })?;
        Ok(Region { mr, map, page_size })
    }

    /// The local key, for scatter/gather entries.
    pub fn lkey(&self) -> u32 {
        self.mr.lkey()
    }

    /// The remote key, for peers' one-sided operations.
    pub fn rkey(&self) -> u32 {
        self.mr.rkey()
    }

    /// The memory region's verbs handle (to bind memory windows over it).
    ///
    /// # Safety
    /// The pointer is valid only while the region lives.
    pub(crate) unsafe fn raw_mr(&self) -> *mut rdma_mummy_sys::ibv_mr {
        // SAFETY: the MR is alive while `self` is.
        unsafe { self.mr.mr().as_ptr() }
    }

    /// The start address (as the device sees it).
    pub fn addr(&self) -> u64 {
        self.map.as_ptr() as u64
    }

    /// The length in bytes (whole pages).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always false: regions are never empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The page size actually backing the region (after any fallback).
    pub fn page_size(&self) -> PageSize {
        self.page_size
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.map
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.map
    }
}

fn map_anonymous(len: usize, page_size: PageSize) -> Result<(MmapMut, PageSize), MemoryError> {
    if let Some(log2) = page_size.log2() {
        let rounded = len.div_ceil(page_size.bytes()) * page_size.bytes();
        match MmapOptions::new().len(rounded).huge(Some(log2)).map_anon() {
            Ok(map) => return Ok((map, page_size)),
            Err(e) => tracing::warn!(
                "no {page_size:?} pages for {rounded} bytes ({e}); using normal pages. Reserve huge pages with \
                 `sysctl vm.nr_hugepages=N` (soft-roce-setup/setup-host does) to avoid this"
            ),
        }
    }
    let rounded = len.div_ceil(PageSize::Normal.bytes()) * PageSize::Normal.bytes();
    let map = MmapOptions::new().len(rounded).map_anon().map_err(|source| MemoryError::Map { len: rounded, source })?;
    Ok((map, PageSize::Normal))
}

/// Checks that a pool of `len` bytes on `page_size` pages fits the memory this machine has
/// free, before anything is mapped: free huge pages of that size when they suffice, else
/// (the region would fall back to normal pages) `MemAvailable`. Registering more than that
/// pins memory the kernel does not have, and the OOM killer then ends other processes.
pub fn check_fits(len: u64, page_size: PageSize) -> Result<(), RdmaError> {
    let meminfo =
        std::fs::read_to_string("/proc/meminfo").map_err(|e| RdmaError::io("cannot read /proc/meminfo", e))?;
    let huge_free = page_size.log2().and_then(|_| {
        let kib = page_size.bytes() / 1024;
        let path = format!("/sys/kernel/mm/hugepages/hugepages-{kib}kB/free_hugepages");
        std::fs::read_to_string(path).ok()?.trim().parse::<u64>().ok().map(|n| n * page_size.bytes() as u64)
    });
    fits(len, page_size, &meminfo, huge_free)
}

/// [`check_fits`] on given `/proc/meminfo` text and free huge-page bytes.
fn fits(len: u64, page_size: PageSize, meminfo: &str, huge_free: Option<u64>) -> Result<(), RdmaError> {
    let huge_free = huge_free.unwrap_or(0);
    if page_size != PageSize::Normal && huge_free >= len {
        return Ok(());
    }
    let available = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| RdmaError::Config("no MemAvailable in /proc/meminfo".into()))?;
    if len <= available {
        return Ok(());
    }
    let mib = |b: u64| b >> 20;
    let huge = if page_size == PageSize::Normal {
        String::new()
    } else {
        format!(" and {} MiB of free {page_size:?} pages", mib(huge_free))
    };
    Err(RdmaError::Limit {
        resource: Resource::FreeMemory,
        needed: len,
        available: available.max(huge_free),
        hint: format!(
            "a pool of {} MiB is more than this machine has free ({} MiB available{huge}): registering it would \
             pin memory the kernel does not have, and the OOM killer would end other processes. Use a smaller \
             --pool-size, reserve huge pages (sysctl vm.nr_hugepages), or pass --force-pool-size",
            mib(len),
            mib(available)
        ),
    })
}

/// The soft memlock limit in bytes, `None` when unlimited or unknown (from /proc/self/limits).
pub fn memlock_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max locked memory"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes_parse() {
        assert_eq!("2M".parse::<PageSize>(), Ok(PageSize::Huge2M));
        assert_eq!("1g".parse::<PageSize>(), Ok(PageSize::Huge1G));
        assert_eq!("none".parse::<PageSize>(), Ok(PageSize::Normal));
        assert!("3M".parse::<PageSize>().unwrap_err().contains("2M, 1G or none"));
    }

    #[test]
    fn fallback_maps_normal_pages_when_huge_pages_are_missing() {
        // Whether or not this host has huge pages, the mapping succeeds and is big enough.
        let (map, page) = map_anonymous(3 << 20, PageSize::Huge2M).unwrap();
        assert!(map.len() >= 3 << 20);
        assert_eq!(map.len() % page.bytes(), 0);
    }

    #[test]
    fn pools_larger_than_free_memory_are_refused() {
        let meminfo = "MemTotal:        2000000 kB\nMemFree:          100000 kB\nMemAvailable:    1000000 kB\n";
        let gib = 1 << 30;
        assert!(fits(512 << 20, PageSize::Normal, meminfo, None).is_ok());
        let e = fits(3 * gib / 2, PageSize::Normal, meminfo, None).unwrap_err();
        assert!(
            matches!(e, RdmaError::Limit { resource: Resource::FreeMemory, needed, .. } if needed == 3 * gib / 2),
            "{e}"
        );
        let e = e.to_string();
        assert!(e.contains("1536 MiB") && e.contains("976 MiB available") && e.contains("--force-pool-size"), "{e}");
        // Enough free huge pages: fine whatever MemAvailable says; not enough: MemAvailable decides.
        assert!(fits(3 * gib / 2, PageSize::Huge2M, meminfo, Some(2 * gib)).is_ok());
        let e = fits(3 * gib / 2, PageSize::Huge2M, meminfo, Some(gib)).unwrap_err().to_string();
        assert!(e.contains("1024 MiB of free Huge2M pages"), "{e}");
        assert!(fits(1, PageSize::Normal, "MemTotal: 1 kB\n", None).is_err(), "no MemAvailable");
        assert!(check_fits(4096, PageSize::Normal).is_ok(), "this machine has a page free");
    }

    #[test]
    fn memlock_limit_is_read() {
        // "unlimited" reads as None; a number as Some. Either way the file parses.
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
        assert!(limits.contains("Max locked memory"));
        let _ = memlock_limit();
    }
}
