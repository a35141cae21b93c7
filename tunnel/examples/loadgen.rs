//! Load generator for `scripts/bench/tunnel`: local services to put behind a tunnel and the
//! clients that measure through it.
//!
//! ```text
//! loadgen echo ADDR                     echo every connection's bytes back
//! loadgen sink ADDR                     read each connection to its end, answer the byte count
//! loadgen latency ADDR N                N sequential connect + 64-byte echo + close: p50 p99 (µs)
//! loadgen parallel ADDR STREAMS SECS    STREAMS connections writing for SECS: Gbit/s delivered
//! ```
//!
//! `parallel` counts bytes the sink confirms it received, not bytes written, so data still in
//! socket buffers when the clock stops is not counted.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let arg = |i: usize| -> Result<&str> {
        args.get(i)
            .map(String::as_str)
            .ok_or_else(|| "usage: loadgen echo|sink|latency|parallel ADDR [ARGS]".into())
    };
    let addr: SocketAddr = arg(1)?.parse()?;
    match arg(0)? {
        "echo" => runtime.block_on(serve(addr, false)),
        "sink" => runtime.block_on(serve(addr, true)),
        "latency" => runtime.block_on(latency(addr, arg(2)?.parse()?)),
        "parallel" => runtime.block_on(parallel(addr, arg(2)?.parse()?, arg(3)?.parse()?)),
        other => Err(format!("unknown mode {other}").into()),
    }
}

async fn serve(addr: SocketAddr, sink: bool) -> Result<()> {
    let listener = TcpListener::bind(addr).await?;
    println!("listening {}", listener.local_addr()?);
    loop {
        let (mut stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        total += n as u64;
                        if !sink && stream.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
            if sink {
                let _ = stream.write_all(&total.to_le_bytes()).await;
            }
        });
    }
}

async fn latency(addr: SocketAddr, count: usize) -> Result<()> {
    let message = [7u8; 64];
    let mut back = [0u8; 64];
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        stream.write_all(&message).await?;
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut back)).await??;
        drop(stream);
        times.push(start.elapsed());
    }
    times.sort();
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    println!("{} {}", at(0.50).as_micros(), at(0.99).as_micros());
    Ok(())
}

async fn parallel(addr: SocketAddr, streams: usize, secs: u64) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..streams {
        tasks.spawn(async move {
            let mut stream = TcpStream::connect(addr).await?;
            let chunk = vec![0x5au8; 128 * 1024];
            while Instant::now() < until {
                stream.write_all(&chunk).await?;
            }
            stream.shutdown().await?;
            let mut count = [0u8; 8];
            stream.read_exact(&mut count).await?;
            Ok::<u64, std::io::Error>(u64::from_le_bytes(count))
        });
    }
    let mut delivered = 0u64;
    while let Some(result) = tasks.join_next().await {
        delivered += result??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!("{:.2}", delivered as f64 * 8.0 / elapsed / 1e9);
    Ok(())
}
