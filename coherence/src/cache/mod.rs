//! The page cache.

pub mod lru;
