//! Runs the benchmarks' link model by hand, in front of a registry, to look
//! into one system's behaviour outside `cargo xtask bench`:
//!
//! ```sh
//! cargo run --release -p sluice-testkit --example link -- 127.0.0.1:5000 100 20
//! ```
//!
//! Arguments: upstream address, Mbit/s (0 = unlimited), added ms per request.
//! Prints the proxy's address, then serves until killed; with `LINK_TRACE=ms`
//! set, also the bytes sent in every interval of that many milliseconds (to
//! see when the link idles).

use std::time::Duration;

use sluice_testkit::proxy::{Link, ThrottlingProxy};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [upstream, mbit, ms] = args.as_slice() else {
        eprintln!("usage: link <upstream host:port> <Mbit/s> <ms per request>");
        std::process::exit(2);
    };
    let parse = |what: &str, v: &str| -> u64 {
        v.parse().unwrap_or_else(|_| {
            eprintln!("link: {what} must be a whole number, got {v:?}");
            std::process::exit(2)
        })
    };
    let upstream = upstream.parse().unwrap_or_else(|e| {
        eprintln!("link: upstream {upstream:?} is not host:port ({e})");
        std::process::exit(2)
    });
    let link = Link {
        bytes_per_second: parse("Mbit/s", mbit) * 1_000_000 / 8,
        latency: Duration::from_millis(parse("ms", ms)),
    };
    let proxy = ThrottlingProxy::start(upstream, link);
    println!("{}", proxy.addr);
    let interval = std::env::var("LINK_TRACE")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis);
    let Some(interval) = interval else {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    };
    let started = std::time::Instant::now();
    let mut last = 0;
    loop {
        std::thread::sleep(interval);
        let now = proxy.bytes.load(std::sync::atomic::Ordering::Relaxed);
        if now != last {
            println!(
                "{:9.3} s {:>10} bytes",
                started.elapsed().as_secs_f64(),
                now - last
            );
        }
        last = now;
    }
}
