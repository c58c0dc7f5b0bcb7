//! `wagate-loadgen baseline`: a bare hyper 1.x HTTP/1.1 server that reads
//! every request body and answers `200 OK`. It is the ceiling to compare the
//! gateway against: same machine, same client, no work per request.

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[derive(Args, Debug, Clone)]
pub struct BaselineArgs {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Exit after this many seconds (1..=86,400), or at SIGINT/SIGTERM.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub max_secs: u64,
}

/// Reads the whole body, answers `200 OK`.
async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let _ = req.into_body().collect().await;
    Ok(Response::new(Full::new(Bytes::from_static(b"OK"))))
}

/// Binds, prints `listening on ADDR`, serves until a signal or `max_secs`.
pub async fn main(a: BaselineArgs) -> ExitCode {
    let listener = match TcpListener::bind(a.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "wagate-loadgen baseline: cannot listen on {}: {e}",
                a.listen
            );
            return ExitCode::from(2);
        }
    };
    let local = match listener.local_addr() {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("wagate-loadgen baseline: no local address: {e}");
            return ExitCode::from(2);
        }
    };
    println!("listening on {local}");
    let _ = std::io::stdout().flush();
    tokio::select! {
        _ = serve(listener) => {}
        _ = shutdown_signal() => eprintln!("wagate-loadgen baseline: signal, exiting"),
        _ = tokio::time::sleep(Duration::from_secs(a.max_secs)) => {
            eprintln!("wagate-loadgen baseline: --max-secs {} elapsed, exiting", a.max_secs)
        }
    }
    ExitCode::SUCCESS
}

/// Accepts forever; one task per connection, keep-alive.
async fn serve(listener: TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // E.g. out of file descriptors: do not spin.
                eprintln!("wagate-loadgen baseline: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(handle))
                .await;
        });
    }
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
