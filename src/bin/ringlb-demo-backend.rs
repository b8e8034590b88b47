//! A small backend for trying ringlb: listens on each address given, and for every connection
//! says which backend answered (with `--greet`) and echoes back whatever it receives.
//!
//! `ringlb-demo-backend --greet 127.0.0.1:9001 127.0.0.1:9002` serves two backends.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::thread;

use clap::Parser;

#[derive(Parser)]
#[command(name = "ringlb-demo-backend", version, about = "Echo backends for trying ringlb")]
struct Cli {
    /// Send "hello from backend ADDRESS" on every new connection before echoing.
    #[arg(long)]
    greet: bool,
    /// Addresses to listen on, e.g. 127.0.0.1:9001.
    #[arg(required = true)]
    addresses: Vec<SocketAddr>,
}

fn serve(mut stream: TcpStream, greeting: Option<String>) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    if let Some(greeting) = greeting {
        stream.write_all(greeting.as_bytes())?;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            // Pass the half-close on, as a proxy's backend would.
            return stream.shutdown(std::net::Shutdown::Write);
        }
        stream.write_all(&buf[..n])?;
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut listeners = Vec::new();
    for address in &cli.addresses {
        match TcpListener::bind(address) {
            Ok(listener) => listeners.push((*address, listener)),
            Err(e) => {
                eprintln!("ringlb-demo-backend: cannot listen on {address}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    eprintln!(
        "ringlb-demo-backend: echoing on {}",
        cli.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
    );
    let greet = cli.greet;
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|(address, listener)| {
            thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    let greeting = greet.then(|| format!("hello from backend {address}\r\n"));
                    thread::spawn(move || serve(stream, greeting));
                }
            })
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
    ExitCode::SUCCESS
}
