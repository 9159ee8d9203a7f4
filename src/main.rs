//! The `rku-engine` binary: parse the command line, run it, print any error.
mod cli;

use clap::Parser;

fn main() {
    if let Err(e) = cli::run(cli::args::Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
