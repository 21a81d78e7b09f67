use clap::{Parser, Subcommand};
use overlay::cli;

/// flannel-compatible overlay network agent with an eBPF datapath.
#[derive(Parser)]
#[command(name = "overlay", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the eBPF datapath with a static peer table (no etcd).
    Datapath(cli::datapath::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli::init_logging();
    match cli.command {
        Command::Datapath(args) => cli::datapath::run(args),
    }
}
