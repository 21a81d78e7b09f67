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
    /// Write Docker daemon options from the subnet file (flannel's mk-docker-opts.sh).
    DockerOpts(cli::docker_opts::Args),
    /// Read or write the network config in etcd, with validation.
    Config(cli::config::Args),
    /// List the subnet leases in etcd with their hosts, backend data and remaining TTL.
    Leases(cli::leases::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli::init_logging();
    match cli.command {
        Command::Datapath(args) => cli::datapath::run(args),
        Command::DockerOpts(args) => cli::docker_opts::run(args),
        Command::Config(args) => cli::config::run(args),
        Command::Leases(args) => cli::leases::run(args),
    }
}
