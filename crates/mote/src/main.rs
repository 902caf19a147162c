//! The `mote` command line: argument parsing and wiring only. Every behaviour lives in a
//! library crate; this file turns flags into calls and results into text or JSON.

mod audit;
mod batch;
mod cli;
mod fed;
mod generate;
mod output;
mod quantize;
mod run;
mod serve;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
    }
}
