//! A worker's splice pipes: held by a direction only while bytes are in it, and pooled when
//! empty. A worker holds at most `limit` at once (their descriptors are set aside from the
//! descriptor budget); a direction that finds none to spare relays that round by copy.

use slab::Slab;

use crate::sys::{self, Pipe};

/// Empty pipes a worker keeps for the next transfer; more are closed.
const IDLE_PIPES: usize = 64;

#[derive(Debug)]
pub(super) struct PipePool {
    /// Pipes held by connections' directions, by index.
    held: Slab<Pipe>,
    /// Empty pipes kept for the next transfer.
    idle: Vec<Pipe>,
    size: u32,
    limit: usize,
}

impl PipePool {
    pub fn new(size: u32, limit: usize) -> PipePool {
        PipePool { held: Slab::new(), idle: Vec::new(), size, limit }
    }

    /// The pipe at `index` (a direction's), or a new one for a direction that holds none: its
    /// index, the pipe and its size. ENOBUFS when the worker holds as many as it may, or the
    /// errno of making one.
    pub fn take(&mut self, index: Option<u32>) -> Result<(u32, &Pipe, u32), i32> {
        let index = match index {
            Some(index) => index as usize,
            None if self.held.len() >= self.limit => return Err(libc::ENOBUFS),
            None => {
                let pipe = match self.idle.pop() {
                    Some(pipe) => pipe,
                    None => sys::pipe(self.size).map_err(|e| e.raw_os_error().unwrap_or(libc::ENFILE))?,
                };
                self.held.insert(pipe)
            }
        };
        Ok((index as u32, &self.held[index], self.size))
    }

    pub fn get(&self, index: u32) -> Option<&Pipe> {
        self.held.get(index as usize)
    }

    /// An emptied pipe comes back: kept for the next transfer, or closed.
    pub fn give_back(&mut self, index: u32) {
        let pipe = self.held.remove(index as usize);
        if self.idle.len() < IDLE_PIPES {
            self.idle.push(pipe);
        }
    }

    /// A pipe with bytes that will never be sent (its connection closed): closed, not reused.
    pub fn discard(&mut self, index: u32) {
        drop(self.held.remove(index as usize));
    }
}
