use clap::{Parser, Subcommand};
use overlay::cli;

/// flannel-compatible overlay network agent with an eBPF datapath.
#[derive(Parser)]
#[command(name = "overlay", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of the agent's flags does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// The node agent, a drop-in flanneld: lease a subnet in etcd, write the subnet file, keep
    /// the datapath equal to the leases. Takes flanneld's flags (also as -flag=value).
    Agent(overlay::agent::AgentArgs),
    /// This host's lease, the peers in the datapath and the counters, from a running agent.
    Status(cli::status::Args),
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
    let cli = Cli::parse_from(overlay::agent::args::normalize_go_flags(std::env::args()));
    let level = match &cli.command {
        Command::Agent(a) => match a.verbosity {
            0 => "info",
            1 | 2 => "debug",
            _ => "trace",
        },
        _ => "info",
    };
    cli::init_logging(level);
    match cli.command {
        Command::Agent(args) => overlay::agent::run(args),
        Command::Status(args) => cli::status::run(args),
        Command::Datapath(args) => cli::datapath::run(args),
        Command::DockerOpts(args) => cli::docker_opts::run(args),
        Command::Config(args) => cli::config::run(args),
        Command::Leases(args) => cli::leases::run(args),
    }
}
