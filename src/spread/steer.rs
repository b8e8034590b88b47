//! Steering new connections to the workers in use (`spread = "pack"`): a classic BPF program
//! on each listener's SO_REUSEPORT group picks, for every incoming SYN, one of the first
//! `count` sockets at random. The program's answer indexes the sockets in the order they
//! started listening, which is the workers' order; an index past the end (a socket closed)
//! falls back to the kernel's hash over all of them.

use std::io;
use std::os::fd::RawFd;

use crate::sys;

/// Steers the new connections of `listener`'s group to its first `count` sockets (it replaces
/// the group's program, so one worker doing it is enough).
pub fn steer(listener: RawFd, count: u32) -> io::Result<()> {
    // From the kernel's uapi headers (the libc crate has it for Android only).
    const SKF_AD_RANDOM: u32 = 56;
    let load_random = libc::sock_filter {
        code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
        jt: 0,
        jf: 0,
        k: (libc::SKF_AD_OFF as u32).wrapping_add(SKF_AD_RANDOM),
    };
    let modulo =
        libc::sock_filter { code: (libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K) as u16, jt: 0, jf: 0, k: count.max(1) };
    let answer = libc::sock_filter { code: (libc::BPF_RET | libc::BPF_A) as u16, jt: 0, jf: 0, k: 0 };
    sys::attach_reuseport_cbpf(listener, &[load_random, modulo, answer])
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn steered_listeners_send_every_connection_to_the_first() {
        let first = sys::listener("127.0.0.1:0".parse().unwrap(), 64, true).unwrap();
        let addr = first.local_addr().unwrap().as_socket().unwrap();
        let second = sys::listener(addr, 64, false).unwrap();
        steer(second.as_raw_fd(), 1).unwrap();
        let clients: Vec<_> = (0..32).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
        for socket in [&first, &second] {
            socket.set_nonblocking(true).unwrap();
        }
        let accepted = |s: &socket2::Socket| std::iter::from_fn(|| s.accept().ok()).count();
        assert_eq!((accepted(&first), accepted(&second)), (32, 0));
        steer(first.as_raw_fd(), 2).unwrap();
        let more: Vec<_> = (0..64).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
        let (a, b) = (accepted(&first), accepted(&second));
        assert_eq!(a + b, 64);
        assert!(a > 0 && b > 0, "both take connections: {a} and {b}");
        drop((clients, more));
    }
}
