//! The `rku-engine` binary: parse the command line, run it, print any error.
mod cli;

use clap::Parser;

fn main() {
    restore_sigpipe();
    if let Err(e) = cli::run(cli::args::Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Rust starts with SIGPIPE ignored, so that output into a closed pipe
/// (`rku-engine plan … | head`) made the next `println!` panic. With the
/// default action the process ends quietly there, as other command-line
/// tools do; files being written are still only temporary names, which
/// the next run writing there removes (`io::output`), so nothing
/// half-written replaces an output.
fn restore_sigpipe() {
    #[cfg(unix)]
    {
        const SIGPIPE: std::ffi::c_int = 13;
        const SIG_DFL: usize = 0;
        extern "C" {
            fn signal(signum: std::ffi::c_int, handler: usize) -> usize;
        }
        // SAFETY: installs the default disposition for one signal; no
        // handler code runs in this process.
        unsafe { signal(SIGPIPE, SIG_DFL) };
    }
}
