//! A TCP proxy that models a network link: one shared bandwidth limit for all
//! connections (server to client) and a delay added to every burst a client
//! sends (about one request's latency). Benchmarks put it in front of the
//! registry and use the same one for every system they compare.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A link: bandwidth in bytes per second (0 = unlimited) and added latency.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    pub bytes_per_second: u64,
    pub latency: Duration,
}

pub struct ThrottlingProxy {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Bytes sent to clients.
    pub bytes: Arc<AtomicU64>,
}

struct Bucket {
    rate: u64,
    next: Mutex<Instant>,
}

impl Bucket {
    /// Blocks until `n` bytes may go out.
    fn take(&self, n: usize) {
        if self.rate == 0 {
            return;
        }
        let wait = {
            let mut next = self.next.lock().expect("bucket");
            let now = Instant::now();
            let end = (*next).max(now) + Duration::from_secs_f64(n as f64 / self.rate as f64);
            *next = end;
            end.saturating_duration_since(now)
        };
        std::thread::sleep(wait);
    }
}

impl ThrottlingProxy {
    pub fn start(upstream: SocketAddr, link: Link) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listen");
        let addr = listener.local_addr().expect("proxy addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let bytes = Arc::new(AtomicU64::new(0));
        let bucket = Arc::new(Bucket {
            rate: link.bytes_per_second,
            next: Mutex::new(Instant::now()),
        });
        let (stop2, bytes2) = (stop.clone(), bytes.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                let _ = client.set_nonblocking(false);
                let _ = client.set_nodelay(true);
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let _ = server.set_nodelay(true);
                let (mut c_read, mut s_write) = (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                let latency = link.latency;
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        let n = match c_read.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        std::thread::sleep(latency);
                        if s_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = s_write.shutdown(std::net::Shutdown::Write);
                });
                let (mut s_read, mut c_write) = (server, client);
                let (bucket, bytes) = (bucket.clone(), bytes2.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        let n = match s_read.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        bucket.take(n);
                        if c_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    let _ = c_write.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        ThrottlingProxy { addr, stop, bytes }
    }
}

impl Drop for ThrottlingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
