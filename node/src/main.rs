//! `kizuna`: see [`node::cli`] for the subcommands.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = node::cli::Cli::parse();
    // Everything a node or a command on its data creates is private to
    // its user (certificates keep the explicit modes `certs` gives them).
    if !matches!(cli.cmd, node::cli::Cmd::Certs { .. }) {
        node::atrest::restrict_umask();
    }
    if let node::cli::Cmd::Card(cmd) = cli.cmd {
        return cmd.run();
    }
    match node::cli::main_with(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kizuna: {}", e.message);
            ExitCode::from(e.code.clamp(1, 255) as u8)
        }
    }
}
