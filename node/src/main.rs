//! `kizuna`: see [`node::cli`] for the subcommands.

use clap::Parser;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = node::cli::Cli::parse();
    if let Err(e) = node::cli::main_with(cli) {
        eprintln!("kizuna: {}", e.message);
        std::process::exit(e.code);
    }
}
