//! One module per `overlay` subcommand: its clap arguments and its `run`.

pub mod config;
pub mod datapath;
pub mod docker_opts;
pub mod leases;
pub mod status;

/// Log to stderr at `level`; `RUST_LOG` overrides it.
pub fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
