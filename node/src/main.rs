use clap::Parser;

#[derive(Parser)]
#[command(name = "kizuna")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Municipal IC card reader.
    #[command(subcommand)]
    Card(node::card::cli::CardCmd),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Card(cmd) => cmd.run(),
    }
}
