//! `wagate-loadgen`: the command line. The work is in the library
//! (`wagate_loadtest::{gen, baseline}`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wagate_loadtest::{baseline, gen};

#[derive(Parser)]
#[command(
    name = "wagate-loadgen",
    version,
    about = "Bounded load generator for wagate (loopback targets only)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Post signed Meta-shaped webhooks and report throughput and latency.
    Run(gen::RunArgs),
    /// A bare hyper server that reads each body and answers 200 OK (the ceiling).
    Baseline(baseline::BaselineArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wagate-loadgen: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match cli.cmd {
        Cmd::Run(a) => rt.block_on(gen::main(a)),
        Cmd::Baseline(a) => rt.block_on(baseline::main(a)),
    };
    // Do not wait for connection tasks still open: everything is reported.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    code
}
