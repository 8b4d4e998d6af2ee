//! [`RemoteBox`]: one plain-old-data value in remote memory, freed when dropped.

use std::alloc::Layout;
use std::marker::PhantomData;

use bytemuck::Pod;
use rdmem_core::{Endpoint, GlobalAddr, RemotePtr, Transport};

use crate::alloc::ThreadAlloc;
use crate::error::Result;

/// A `T` in remote memory, allocated by a [`ThreadAlloc`] and freed on drop (a failed free
/// is logged) or with [`RemoteBox::free`] (which reports it). Reads and writes are one-sided.
/// `T` is plain old data ([`bytemuck::Pod`]): its bytes are all there is to it.
pub struct RemoteBox<'a, T: Pod, Tr: Transport> {
    ptr: RemotePtr<T>,
    alloc: &'a ThreadAlloc<Tr>,
    freed: bool,
    _value: PhantomData<T>,
}

impl<'a, T: Pod, Tr: Transport> RemoteBox<'a, T, Tr> {
    /// Allocates room for a `T` and writes `value` there.
    pub fn new(alloc: &'a ThreadAlloc<Tr>, value: T) -> Result<Self> {
        let addr = alloc.alloc(Layout::new::<T>())?;
        let b = RemoteBox { ptr: RemotePtr::new(addr), alloc, freed: false, _value: PhantomData };
        b.write(&value)?;
        Ok(b)
    }

    /// Reads the value (one READ).
    pub fn read(&self) -> Result<T> {
        let mut value = T::zeroed();
        self.alloc.with_endpoint(|ep| ep.read(self.addr(), bytemuck::bytes_of_mut(&mut value)))?;
        Ok(value)
    }

    /// Writes the value (one WRITE).
    pub fn write(&self, value: &T) -> Result<()> {
        Ok(self.alloc.with_endpoint(|ep| ep.write(self.addr(), bytemuck::bytes_of(value)))?)
    }

    /// Where the value lives.
    pub fn addr(&self) -> GlobalAddr {
        self.ptr.addr()
    }

    /// The typed remote pointer.
    pub fn ptr(&self) -> RemotePtr<T> {
        self.ptr
    }

    /// Frees the value now, reporting a failure.
    pub fn free(mut self) -> Result<()> {
        self.freed = true;
        self.alloc.free(self.addr())
    }
}

impl<T: Pod, Tr: Transport> Drop for RemoteBox<'_, T, Tr> {
    fn drop(&mut self) {
        if !self.freed {
            if let Err(e) = self.alloc.free(self.addr()) {
                tracing::warn!("RemoteBox at {} could not be freed on drop: {e}", self.addr());
            }
        }
    }
}
